"""Derivative names, atomic writes and the output dataset's description."""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline import __version__, derivatives
from pipeline.errors import InputDataError, OutputNotWritable, UsageError
from pipeline.kinds import PROCESSED_KINDS


@pytest.mark.parametrize(
    ("entities", "expected"),
    [
        ({"sub": "01", "desc": "audit"}, "sub-01/anat/sub-01_desc-audit_T1w.json"),
        (
            {"sub": "01", "ses": "02", "run": "1", "acq": "mp", "desc": "audit"},
            "sub-01/ses-02/anat/sub-01_ses-02_acq-mp_run-1_desc-audit_T1w.json",
        ),
        (
            {"sub": "01", "space": "MNI", "res": "2", "desc": "preproc"},
            "sub-01/anat/sub-01_space-MNI_res-2_desc-preproc_T1w.json",
        ),
    ],
)
def test_build_path_orders_entities(entities, expected):
    assert derivatives.build_path(entities, suffix="T1w", extension=".json").as_posix() == expected


def test_build_path_refuses_unknown_entities():
    with pytest.raises(ValueError, match="Unknown BIDS entities"):
        derivatives.build_path({"sub": "01", "colour": "red"}, suffix="T1w", extension=".json")


def test_source_entities_keep_only_what_carries_over():
    assert derivatives.source_entities("/x/sub-01_ses-1_acq-a_run-2_T1w.nii.gz") == {
        "sub": "01",
        "ses": "1",
        "acq": "a",
        "run": "2",
    }
    with pytest.raises(InputDataError, match="not a BIDS file name"):
        derivatives.parse_bids_name("T1w scan.nii.gz")


def test_atomic_path_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "out" / "file.json"
    with pytest.raises(RuntimeError), derivatives.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    derivatives.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_atomic_nifti_keeps_extension(tmp_path):
    with derivatives.atomic_path(tmp_path / "x_T1w.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert (tmp_path / "x_T1w.nii.gz").read_bytes() == b"x"


def _describe(output_dir: str) -> None:
    description = derivatives.dataset_description(bids_dir=Path("/data"), source_description=None, container=None)
    derivatives.ensure_dataset_description(Path(output_dir), description)


def test_dataset_description_is_safe_under_concurrency(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_describe, args=(str(tmp_path),)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers)
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0] == {
        "Name": "bidsdl",
        "Version": __version__,
        "CodeURL": derivatives.CODE_URL,
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp.json")] == []


def test_dataset_description_records_container_and_source(tmp_path):
    description = derivatives.dataset_description(
        bids_dir=tmp_path,
        source_description={"Name": "ds", "DatasetDOI": "10.1/x"},
        container={"Type": "docker", "Tag": "bidsdl:0.1"},
    )
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "bidsdl:0.1"}
    assert description["SourceDatasets"][0]["DOI"] == "10.1/x"
    assert description["SourceDatasets"][0]["URL"].startswith("file://")


def test_foreign_output_dataset_is_refused(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    with pytest.raises(UsageError, match="fMRIPrep"):
        _describe(str(tmp_path))


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritable, match="cannot be created or written"):
        derivatives.check_writable(blocker / "out")


def test_participant_lock_is_exclusive_and_does_not_wait(tmp_path):
    from pipeline.derivatives import participant_lock

    with (
        participant_lock(tmp_path, "01") as first,
        participant_lock(tmp_path, "01") as second,
        participant_lock(tmp_path, "02") as other,
    ):
        assert first and not second and other
    with participant_lock(tmp_path, "01") as again:
        assert again
    assert (tmp_path / "sub-01" / "log" / ".bidsdl.lock").exists()


def test_writers_and_readers_name_files_from_one_table(tmp_path):
    """Every sink of the workflows writes where :func:`derivatives.named_path` (what readers use) looks."""
    from pipeline.interfaces.derivatives import sink_inputs
    from pipeline.workflows.outputs import _INFERENCE_OUTPUTS, _OUTPUTS

    bids = tmp_path / "bids"
    source = bids / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_echo-1_T1w.nii.gz"
    for output in (*_OUTPUTS, *_INFERENCE_OUTPUTS):
        kind = derivatives.DERIVATIVES[output.name]
        in_file = tmp_path / f"result{'.nii' if kind.extension == '.nii.gz' else kind.extension}"
        in_file.write_text("{}" if kind.extension == ".json" else "x")
        inputs = sink_inputs(output.name, 1.5)
        entities = {("from" if k == "from_" else k): v for k, v in inputs.items() if k not in ("suffix", "datatype")}
        written = derivatives.save_derivative(
            tmp_path / "out", in_file, source=source, bids_dir=bids, suffix=inputs["suffix"],
            datatype=inputs["datatype"], **entities,
        )  # fmt: skip
        assert written == derivatives.named_path(tmp_path / "out", source, output.name, model_resolution=1.5)
        rel = written.relative_to(tmp_path / "out").as_posix()
        patterns = [ln for ln in derivatives.bidsignore().splitlines() if ln and not ln.startswith("#")]
        ignored = any(fnmatch.fnmatch(written.name, p) or fnmatch.fnmatch(rel, f"{p}/*") for p in patterns)
        assert "echo-1" in written.name and (kind.bids or ignored), f"{rel} is neither BIDS nor in .bidsignore"


def test_the_patterns_of_files_bids_does_not_define_match_no_bids_file():
    """What .bidsignore (and the group level's globbing) names by pattern hides no BIDS derivative, for every
    processed kind (a FLAIR's records as a T1w's)."""
    names = {"model_resolution": 2.0, "label_desc": "structures", "structure": "Left-Hippocampus"}
    for image_kind in PROCESSED_KINDS:
        source = f"sub-01/ses-1/anat/sub-01_ses-1_run-1_chunk-2_{image_kind}.nii.gz"
        files = {name: derivatives.named_path(Path("out"), source, name, **names).name
                 for name in derivatives.DERIVATIVES}  # fmt: skip
        for name, kind in derivatives.DERIVATIVES.items():
            if kind.bids:
                continue
            for pattern in kind.patterns_of((image_kind,)):
                matched = {other for other, file in files.items() if fnmatch.fnmatch(file, pattern)}
                assert name in matched and not any(derivatives.DERIVATIVES[other].bids for other in matched), pattern
                if kind.entities.get("desc") not in (None, derivatives.LABEL_DESC):  # readers glob it: unique
                    assert matched == {name}, f"{pattern} matches {sorted(matched)}"
