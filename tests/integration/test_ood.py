"""Predictions that know their limits: a model package applied to new people like its training cohort and to images
unlike it (generated: a FLAIR stored as T1w, an inverted contrast, an infant's head, another scanner's contrast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline import derivatives
from pipeline.errors import InputDataError
from pipeline.learn import ood
from pipeline.learn.ensemble import load_models
from pipeline.learn.package import read_package
from pipeline.learn.tasks.image.inference import infer
from tests.helpers import AFFINE, validator_issues

RES = ("--model-resolution", "4", "--nprocs", "2")
#: Unfamiliar kinds that quality control refuses before any model sees them (registration and white-matter checks
#: against a T1w template), and those that pass it and must be told by the distribution check.
REFUSED, PASSING = ("flair", "inverted"), ("infant", "scanner")
#: Which check tells each passing kind: the infant's anatomy moves the network's features; another scanner's contrast
#: leaves this small model's features within range but moves the image's SNR and contrast out of the cohort's.
TOLD_BY = {"infant": "features", "scanner": "metrics"}


@pytest.fixture(scope="module")
def new_cohort(learning_sample, trained_package, tmp_path_factory):
    """Six new people like the training cohort and one of each unfamiliar kind, predicted by the trained package."""
    from pipeline.cli.run import main
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    root = tmp_path_factory.mktemp("unfamiliar")
    bids = root / "bids"
    write_sample_dataset(bids, SampleOptions(n_subjects=6, seed=11, label_prefix="new", voxel_scale=3, n_jobs=2,
                                             two_session_fraction=0.0,
                                             unfamiliar=REFUSED + PASSING))  # fmt: skip
    kinds = json.loads((bids / "sourcedata" / "generation.json").read_text())["unfamiliar"]
    out = root / "out"
    code = main([str(bids), str(out), "participant", "--model", str(trained_package), "-w", str(root / "work"), *RES,
                 *AFFINE])
    return bids, out, kinds, code


def _records(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["source"]: json.loads(p.read_text()) for p in out.rglob("*_prediction.json")}


@pytest.mark.slow  # a new cohort preprocessed and predicted: ~3 min
def test_unfamiliar_images_are_flagged_and_new_people_like_the_cohort_rarely(new_cohort, trained_package):
    bids, out, kinds, code = new_cohort
    assert code != 0  # quality control failed the grossest two (the others finished)
    records = _records(out)
    familiar = [r for r in records.values() if r["participant_id"] not in kinds]
    assert len(familiar) >= 6
    assert sum(bool(r["out_of_distribution"]) for r in familiar) <= len(familiar) // 6, [
        (r["source"], r["distribution_check"]["reasons"]) for r in familiar if r["out_of_distribution"]
    ]
    entry = read_package(trained_package)["distribution"]
    assert entry["calibration"]["n_validation"] > 0 and "validation" in entry["calibration"]["calibrated_on"]
    models = load_models([trained_package])
    for participant, kind in kinds.items():
        (source,) = [s for s in records if s.startswith(participant)] or [None]
        if kind in PASSING:  # predicted, written, and flagged with the reason
            record = records[source]
            assert record["out_of_distribution"] is True, kind
            check = record["distribution_check"]  # told by the check that should tell it, not by any flag
            if TOLD_BY[kind] == "features":
                assert check["score"] > check["threshold"], (kind, check)
                assert any(r.startswith("the network's features are unlike") for r in check["reasons"]), (kind, check)
            else:
                assert any(r.split()[0] in ("snr_gm", "snr_wm", "cnr", "cjv") for r in check["metrics_outside"]), check
            assert record["predicted"] in ("AD", "CN") and record["uncertainty"]["members"] == 2
            sidecar = next(out.rglob(f"{participant}_*_desc-gradcam_attribution.json"))
            assert json.loads(sidecar.read_text())["OutOfDistribution"] is True
            report = (out / f"{participant}.html").read_text()
            assert 'class="ood-banner" role="alert"' in report and "do not trust this prediction" in report
        else:  # refused by quality control: no prediction; had the models seen it, they would have flagged it too
            assert source is None, kind
            status = json.loads(derivatives.status_path(out, participant.removeprefix("sub-")).read_text())
            assert status["state"] == "failed"
            t1w = next((bids / participant).rglob("*_T1w.nii.gz")).relative_to(bids)
            image = derivatives.named_path(out, t1w, "preproc_model", model_resolution=4)
            result = infer(models, np.asarray(nib.load(image).dataobj, dtype=np.float32))
            check = ood.check_image(models, result.features, derivatives.named_path(out, t1w, "iqm"))
            assert check["out_of_distribution"] is True, kind
    # the features tell the familiar from the unfamiliar they should tell: every familiar image scores below them
    unlike = [records[s]["distribution_check"]["score"] for s in records
              if TOLD_BY.get(kinds.get(records[s]["participant_id"], ""), "") == "features"]  # fmt: skip
    scores = [r["distribution_check"]["score"] for r in familiar]
    assert unlike and max(scores) < min(unlike), (scores, unlike)
    for record in familiar:
        assert record["uncertainty"]["fold_sd"] is not None and 0 <= record["uncertainty"]["entropy"] <= 1


@pytest.mark.slow  # a new cohort preprocessed and predicted: ~3 min
def test_the_external_evaluation_tells_flagged_from_unflagged(new_cohort, trained_package, run_cli):
    bids, out, kinds, _ = new_cohort
    code, _, err = run_cli(bids, out, "group", "--model", trained_package)
    assert code == 0, err
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    flagged = set(table.loc[table["out_of_distribution"].astype(str) == "True", "participant_id"])
    passing = {p for p, k in kinds.items() if k in PASSING}
    assert passing <= flagged and len(flagged - passing) <= 1
    assert {"distribution_score", "distribution_reasons", "ensemble_sd"} <= set(table.columns)
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    split = evaluation["by_distribution"]
    assert split["flagged"]["n"] == len(table[table["participant_id"].isin(flagged)]) and split["unflagged"]["n"] > 0
    assert "flagged image(s): mean 1 - probability of the true class" in split["text"]
    assert {o["source"].split("/")[0] for o in evaluation["out_of_distribution"]} == flagged
    refused = {s["source"].split("/")[0] for s in evaluation["skipped"]}
    assert refused == {p for p, k in kinds.items() if k in REFUSED}
    report = (out / "group.html").read_text()
    assert 'id="distribution"' in report and "Flagged against unflagged" in report
    assert not [i for i in validator_issues(out) if i["severity"] == "error"]


def test_a_changed_distribution_record_is_refused(trained_package, tmp_path):
    copy = tmp_path / trained_package.name
    shutil.copytree(trained_package, copy)
    with open(copy / ood.FILE, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(InputDataError, match=r"distribution\.safetensors is missing or does not match"):
        read_package(copy)
