"""Inference, the leakage guard, export and meshes on small packages and arrays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import InputDataError, UsageError
from pipeline.learn import ensemble, export, infer, package
from pipeline.learn.tasks.image import inference
from pipeline.ops.mesh import mask_surface, surface_summary, write_gifti
from tests.helpers import SHAPE, make_package


def model_input(folder: Path, *, zoom: float = 4.0, shape=SHAPE, space="MNI152NLin2009aSym") -> Path:
    rng = np.random.default_rng(0)
    path = folder / f"sub-02_space-{space}_res-{zoom:g}_desc-preproc_T1w.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(0.5, 1, shape).astype(np.float32), np.diag([zoom, zoom, zoom, 1])), path)
    return path


def test_inference_gives_probabilities_and_attribution_maps(tmp_path):
    models = ensemble.load_models([make_package(tmp_path / "a"), make_package(tmp_path / "b", seed=1)])
    array = inference.check_input_image(models[0].record, model_input(tmp_path))
    result = inference.infer(models, array)
    assert result.output.shape == (2,) and np.isclose(result.output.sum(), 1)
    assert np.allclose(result.output, np.mean(result.per_model, axis=0))
    for volume in (result.saliency, result.gradcam):
        assert volume.shape == SHAPE and volume.min() >= 0 and volume.max() <= 1 and volume.max() > 0
    again = inference.infer(models, array)
    assert np.array_equal(result.output, again.output) and np.array_equal(result.gradcam, again.gradcam)
    record = inference.prediction_record(models, result, source="sub-02/anat/x.nii.gz", participant_id="sub-02",
                                     seen_in_training=[])  # fmt: skip
    assert record["predicted"] in ("CN", "AD") and record["threshold"] == pytest.approx(0.4)
    assert [m["content_sha256"] for m in record["models"]] == [m.record["content_sha256"] for m in models]
    assert record["model_card"][0]["not_for_clinical_use"] and not record["seen_in_training"]
    json.dumps(record)  # JSON-ready

    # gathered at the group level through the one reader; a damaged record is skipped, named, not a crash
    from pipeline.learn.external import gather_predictions, prediction_path

    out = tmp_path / "out"
    manifest = pd.DataFrame({"participant_id": ["sub-02", "sub-03"], "session_id": [None, None],
                             "source": ["sub-02/anat/sub-02_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"]})  # fmt: skip
    for source, text in zip(manifest["source"], (json.dumps(record), '{"source": "sub-03/anat/sub-03_T1w.nii.gz"'),
                            strict=True):  # fmt: skip
        prediction_path(out, source).parent.mkdir(parents=True, exist_ok=True)
        prediction_path(out, source).write_text(text)
    classes = models[0].record["classes"]
    table, skipped = gather_predictions(manifest, out, [m.record for m in models],
                                        lambda r: models[0].task.external_row(r, classes))  # fmt: skip
    assert list(table["participant_id"]) == ["sub-02"] and list(table["predicted"]) == [record["predicted"]]
    assert skipped[0]["source"].startswith("sub-03") and "cannot be read" in skipped[0]["reason"]
    assert str(prediction_path(out, manifest["source"][1])) in skipped[0]["reason"]


def test_regression_outputs_are_back_on_the_target_scale(tmp_path):
    models = ensemble.load_models([make_package(tmp_path, task="regression")])
    result = inference.infer(models, inference.check_input_image(models[0].record, model_input(tmp_path)))
    assert 40 < float(result.output[0]) < 100  # 70 +- a few SD of 5


def test_leakage_guard_matches_ids_and_image_hashes(tmp_path):
    record = package.read_package(make_package(tmp_path, training=[("sub-01", "aaa"), ("sub-03", "bbb")]))
    # a package that names no dataset: IDs compared as they are, and the reason says so
    assert ensemble.training_matches([record], "sub-02", ["ccc"], dataset="x") == []
    (by_id,) = ensemble.training_matches([record], "sub-01", ["ccc"], dataset="x")
    assert "sub-01 is a training subject" in by_id and "names no dataset" in by_id
    renamed = ensemble.training_matches([record], "sub-77", ["bbb"], dataset="x")
    assert len(renamed) == 1 and "voxel data of sub-03" in renamed[0]
    named = {**record, "dataset": {"key": "mine"}}  # one that does: another dataset's sub-01 is someone else
    assert ensemble.training_matches([named], "sub-01", ["ccc"], dataset="theirs") == []
    assert ensemble.training_matches([named], "sub-01", ["ccc"], dataset="mine")


def test_input_in_another_space_resolution_or_grid_is_refused(tmp_path):
    record = package.read_package(make_package(tmp_path))
    with pytest.raises(InputDataError, match=r"2x2x2 mm; the model .* expects 4 mm"):
        inference.check_input_image(record, model_input(tmp_path, zoom=2.0))
    with pytest.raises(InputDataError, match=r"space 'MNI152NLin6Asym'; the model .* expects 'MNI152NLin2009aSym'"):
        inference.check_input_image(record, model_input(tmp_path, space="MNI152NLin6Asym"))
    with pytest.raises(InputDataError, match=r"shape \(16, 16, 16\)"):
        inference.check_input_image(record, model_input(tmp_path, shape=(16, 16, 16)))
    with pytest.raises(UsageError, match=r"expects input at 4 mm .* prepares 2 mm"):
        ensemble.check_resolution([record], 2.0, [tmp_path])


def test_models_that_cannot_be_averaged_are_refused(tmp_path):
    a = make_package(tmp_path / "a")
    b = make_package(tmp_path / "b", task="regression")
    with pytest.raises(UsageError, match="cannot form an ensemble: task is 'classification' in the first"):
        ensemble.load_models([a, b])


def test_bad_packages_are_refused_with_what_to_do(tmp_path):
    good = make_package(tmp_path / "ok")
    with pytest.raises(InputDataError, match="does not exist"):
        package.read_package(tmp_path / "missing")
    # incomplete: a weights file lost in the copy
    incomplete = tmp_path / "incomplete"
    subprocess.run(["cp", "-r", str(good), str(incomplete)], check=True)
    (incomplete / "fold-1.safetensors").unlink()
    with pytest.raises(InputDataError, match=r"incomplete: fold-1\.safetensors is missing"):
        package.read_package(incomplete)
    # a pickle checkpoint, alone or in place of the weights
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"state_dict": {}}, pickled / "model.pt")
    with pytest.raises(InputDataError, match=r"model\.pt: pickle checkpoints are refused"):
        package.read_package(pickled)
    swapped = tmp_path / "swapped"
    subprocess.run(["cp", "-r", str(good), str(swapped)], check=True)
    torch.save({"w": torch.zeros(2)}, swapped / "fold-0.safetensors")
    with pytest.raises(InputDataError, match="not a safetensors file"):
        package.read_package(swapped)
    # made by an incompatible bidsdl: another package format
    future = tmp_path / "future"
    subprocess.run(["cp", "-r", str(good), str(future)], check=True)
    record = json.loads((future / "model.json").read_text())
    record.update(format_version=99, bidsdl_version="9.0.0")
    record["content_sha256"] = package.content_hash(record)
    (future / "model.json").write_text(json.dumps(record))
    with pytest.raises(
        InputDataError, match=r"made by bidsdl 9.0.0 in package format 99; this bidsdl .* reads formats 1, 2\."
    ):
        package.read_package(future)
    # an older format is read (its readers keep their fallbacks: see package.FORMAT_CHANGES)
    older = tmp_path / "older"
    subprocess.run(["cp", "-r", str(good), str(older)], check=True)
    record = json.loads((older / "model.json").read_text())
    record.update(format_version=1)
    record.pop("dataset", None)
    record["content_sha256"] = package.content_hash(record)
    (older / "model.json").write_text(json.dumps(record))
    assert package.read_package(older)["format_version"] == 1
    # a record without a field every package has (re-hashed, so only the schema can tell): refused, naming it
    foreign = tmp_path / "foreign"
    subprocess.run(["cp", "-r", str(good), str(foreign)], check=True)
    record = json.loads((foreign / "model.json").read_text())
    del record["training_subjects"]
    record["classes"] = "CN,AD"
    record["content_sha256"] = package.content_hash(record)
    (foreign / "model.json").write_text(json.dumps(record))
    with pytest.raises(InputDataError, match=r"'training_subjects' is missing; 'classes' is a string, not a list"):
        package.read_package(foreign)


def test_the_writer_keeps_to_the_record_schema(tmp_path):
    """model.json has one schema (package.MODEL_FIELDS): a writer that adds an unlisted field, or leaves out a required
    one, fails before anything is written."""
    folder = make_package(tmp_path / "ok")
    good = package.read_package(folder)
    record = {k: v for k, v in good.items() if k not in ("format_version", "bidsdl_version", "weights",
                                                          "content_sha256")}  # fmt: skip
    weights = {e["file"]: folder / e["file"] for e in good["weights"]}
    with pytest.raises(ValueError, match=r"'threshhold' is not a field of model\.json"):
        package.write_package(tmp_path / "new", record={**record, "threshhold": 0.5}, weights=weights, files={})
    with pytest.raises(ValueError, match=r"'task' is missing"):
        package.write_package(tmp_path / "new", record={k: v for k, v in record.items() if k != "task"},
                              weights=weights, files={})  # fmt: skip
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_gives_the_same_outputs_as_the_package(tmp_path, fmt):
    if fmt == "onnx" and not export.onnx_available():
        pytest.skip("onnx, onnxscript or onnxruntime is not installed")
    folder = make_package(tmp_path)
    out = tmp_path / f"exported{export.SUFFIX[fmt]}"
    code = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.export", str(folder), "--format", fmt, "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["PackageContentSha256"] == package.read_package(folder)["content_sha256"]
    # independent check on new inputs: the export and the package's networks agree
    _, networks = package.load_package(folder)
    x = torch.randn(3, 1, *SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.stack([torch.softmax(n(x), 1) for n in networks]).mean(0).numpy()
    assert np.abs(export.run_exported(out, fmt, x) - expected).max() < 1e-4


def test_export_refuses_writing_into_the_package(tmp_path):
    folder = make_package(tmp_path)
    with pytest.raises(UsageError, match="inside the package"):
        export.export_package(folder, "torchscript", folder / "model.pt")


def test_mask_surface_is_closed_and_measures_the_mask(tmp_path):
    grid = np.indices((40, 40, 40)).astype(float)
    ball = ((grid - 19.5) ** 2).sum(axis=0) <= 12**2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    vertices, faces = mask_surface(ball, affine, step_size=1)
    summary = surface_summary(vertices, faces)
    true_ml = ball.sum() * 8 / 1000
    assert abs(summary["volume_ml"] - true_ml) / true_ml < 0.05
    assert all(47 < e < 51 for e in summary["extent_mm"])  # diameter 24 voxels of 2 mm
    path = write_gifti(vertices, faces, tmp_path / "mask.surf.gii")
    loaded = nib.load(path)
    assert np.allclose(loaded.darrays[0].data, vertices) and np.array_equal(loaded.darrays[1].data, faces)
    with pytest.raises(ValueError, match="empty"):
        mask_surface(np.zeros((4, 4, 4)), affine)


def test_the_inference_node_work_writes_maps_records_and_guards(tmp_path):
    folder = make_package(tmp_path, training=[("sub-01", "hash01")])
    image = model_input(tmp_path)
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"intensity": {"data_sha256": "other"}}))
    resampling = tmp_path / "resampling.json"
    resampling.write_text(json.dumps({"SpatialReference": "MNI152NLin2009aSym"}))
    spec = {"in_file": str(image), "mask": str(image), "audit": str(audit), "resampling_record": str(resampling),
            "source": "sub-02/anat/sub-02_T1w.nii.gz", "participant_id": "sub-02", "model_dirs": [str(folder)],
            "model_hashes": [package.read_package(folder)["content_sha256"]], "allow_training_subjects": False,
            "device": "auto", "num_threads": 1}  # fmt: skip
    out = tmp_path / "node"
    out.mkdir()
    outputs = infer.run_node(spec, out)
    assert json.loads(Path(outputs["record"]).read_text())["participant_id"] == "sub-02"
    assert nib.load(outputs["gradcam"]).shape == SHAPE and Path(outputs["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(outputs["metadata"]).read_text())["SeenInTraining"] is False
    # a training subject is refused; with the flag it is predicted and marked
    audit.write_text(json.dumps({"intensity": {"data_sha256": "hash01"}}))
    with pytest.raises(InputDataError, match="voxel data of sub-01"):
        infer.run_node(spec, out)
    marked = infer.run_node({**spec, "allow_training_subjects": True}, out)
    assert json.loads(Path(marked["record"]).read_text())["seen_in_training"] is True
    # the package changed since the run was planned
    with pytest.raises(InputDataError, match="changed while this run used them"):
        infer.run_node({**spec, "model_hashes": ["0" * 64]}, out)
    # the same work through the command the Nipype node runs, in a fresh interpreter
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "allow_training_subjects": True}))
    done = subprocess.run([sys.executable, "-m", "pipeline.learn.infer", str(tmp_path / "spec.json"), str(out)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"saliency", "gradcam", "record", "metadata", "figure"}
