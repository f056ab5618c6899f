"""People's quality ratings (--qc-ratings): reading, matching, the rule across raters, the rows ignored."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.errors import InputDataError
from pipeline.ratings import RULE, apply_ratings, read_ratings

QC = pd.DataFrame({
    "participant_id": ["sub-01", "sub-01", "sub-02", "sub-03", "sub-04"],
    "source": ["sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz",
               "sub-02/anat/sub-02_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz", "sub-04/anat/sub-04_T1w.nii.gz"],
    "qc_verdict": ["pass"] * 5,
})  # fmt: skip


def _ratings(tmp_path, text):
    path = tmp_path / "ratings.tsv"
    path.write_text(text)
    return read_ratings(path), path


def test_the_rule_across_raters_and_the_rows_ignored(tmp_path):
    ratings, path = _ratings(tmp_path, (
        "participant_id\tsource\trating\trater\tcomment\n"
        "sub-01\tsub-01_ses-02_T1w.nii.gz\tbad\tana\tghosting\n"   # by file name: one session only
        "01\tsub-01_ses-02_T1w.nii.gz\tgood\tben\t\n"              # 1 of 2 bad: half -> left out
        "sub-02\t\tbad\tana\tmotion\n"                              # the participant's every image
        "sub-02\t\tgood\tben\t\n"
        "sub-02\t\tgood\tcai\t\n"                                   # 1 of 3 bad -> kept, doubtful
        "sub-03\t\tdoubtful\tana\tblurry\n"
        "sub-04\t\tbad\tana\tfirst look\n"
        "sub-04\t\tgood\tana\tsecond look\n"                        # the rater's last row wins
        "sub-99\t\tbad\tana\t\n"                                     # unknown participant
        "sub-03\tsub-03_T2w.nii.gz\tbad\tana\t\n"                    # unknown image
        "sub-03\t\tterrible\tben\t\n"                                # not a rating
    ))
    rated, summary = apply_ratings(QC, ratings, path=path)
    decision = dict(zip(rated["source"], rated["qc_rating"], strict=True))
    assert decision == {QC.source[0]: "", QC.source[1]: "bad", QC.source[2]: "doubtful", QC.source[3]: "doubtful",
                        QC.source[4]: "good"}  # fmt: skip
    reason = rated.set_index("source").at[QC.source[1], "qc_rating_reason"]
    assert reason.startswith("rated bad by 1 of 2 rater(s) (ana): ana: ghosting") and "--qc-ratings" in reason
    assert [r["source"] for r in summary["left_out"]] == [QC.source[1]]
    assert {d["source"] for d in summary["disagreements"]} == {QC.source[1], QC.source[2]}
    assert [r["row"] for r in summary["ignored"]] == [10, 11, 12]  # the file's line numbers
    assert "no such participant" in summary["ignored"][0]["reason"]
    assert "no such image" in summary["ignored"][1]["reason"] and "'terrible'" in summary["ignored"][2]["reason"]
    assert summary["rule"] == RULE and summary["raters"] == ["ana", "ben", "cai"] and len(summary["sha256"]) == 64


def test_a_file_without_the_needed_columns_is_refused(tmp_path):
    path = tmp_path / "ratings.tsv"
    path.write_text("subject\tscore\nsub-01\t3\n")
    with pytest.raises(InputDataError, match="no column participant_id, rating"):
        read_ratings(path)
    with pytest.raises(InputDataError, match="cannot be read"):
        read_ratings(tmp_path / "missing.tsv")


def test_ratings_without_quality_records_are_all_ignored(tmp_path):
    ratings, path = _ratings(tmp_path, "participant_id\trating\nsub-01\tbad\n")
    rated, summary = apply_ratings(pd.DataFrame(), ratings, path=path)
    assert rated.empty and len(summary["ignored"]) == 1 and not summary["left_out"]
