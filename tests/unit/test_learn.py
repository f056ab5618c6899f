"""Learning functions on small arrays: splits, leakage checks, training determinism and resume, packages."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import InputDataError, UsageError
from pipeline.learn import ARCHITECTURE_NAMES, cohort, evaluate, leakage, package, splits
from pipeline.learn.device import resolve_device, seed_everything
from pipeline.learn.models import ARCHITECTURES, Conv5FC3, ModelConfig, build_model
from pipeline.learn.registry import get_task
from pipeline.learn.tasks.classification import class_labels
from pipeline.learn.train import FitHooks, TrainSettings, Volumes, fit, predict

SHAPE = (16, 16, 16)


def planted_volumes(folder: Path, n: int, *, seed: int, signal: float = 1.0) -> tuple[list[Path], np.ndarray]:
    """``n`` noisy volumes; class 1 has a brighter blob (a stand-in for enlarged ventricles)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        volume = rng.normal(0, 1, SHAPE).astype(np.float32)
        volume[5:11, 5:11, 5:11] += signal * label
        paths.append(folder / f"v{i:03d}.npy")
        np.save(paths[-1], volume[None])
    return paths, labels.astype(np.float32)


CLASSIFICATION = get_task("classification")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Conv5FC3(2, channels=(4, 4, 8, 8, 8), hidden=(16,), dropout=0.2)


def settings(**kwargs) -> TrainSettings:
    defaults = {"n_outputs": 2, "epochs": 4, "batch_size": 8, "lr": 3e-3, "patience": 10}
    return TrainSettings(**{**defaults, **kwargs})


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Volumes, Volumes]:
    folder = tmp_path_factory.mktemp("planted")
    paths, labels = planted_volumes(folder, 48, seed=1)
    return Volumes(paths[:32], labels[:32]), Volumes(paths[32:], labels[32:])


def test_registry_names_match():
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", ["resnet10", "conv5fc3"])
def test_architectures_build_from_their_config(name):
    config = ModelConfig(architecture=name, n_outputs=2, in_shape=(32, 32, 32))
    net = build_model(ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
    assert net(torch.zeros(2, 1, 32, 32, 32)).shape == (2, 2)


def test_unknown_architecture_is_a_usage_error():
    with pytest.raises(UsageError, match="choose one of"):
        build_model(ModelConfig(architecture="vgg", n_outputs=2, in_shape=(8, 8, 8)))


def test_training_is_deterministic(planted, tmp_path):
    train, val = planted
    results = []
    for run in ("a", "b"):
        seed_everything(3)
        model = tiny_model()
        fit(model, train, val, settings(epochs=2, augment=("affine", "noise", "intensity")), task=CLASSIFICATION,
            run_dir=tmp_path / run,
            device=torch.device("cpu"))  # fmt: skip
        results.append(weights_of(model))
    assert same_weights(*results)
    history_a = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t").drop(columns="epoch_time_s")
    history_b = pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t").drop(columns="epoch_time_s")
    pd.testing.assert_frame_equal(history_a, history_b)


def test_resume_after_a_kill_ends_with_the_same_weights(planted, tmp_path):
    train, val = planted
    uninterrupted = tiny_model()
    common = {"task": CLASSIFICATION, "device": torch.device("cpu")}
    fit(uninterrupted, train, val, settings(), run_dir=tmp_path / "full", **common)

    class Killed(Exception):
        pass

    def kill_after_epoch_2(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(tiny_model(), train, val, settings(), task=CLASSIFICATION,
            run_dir=tmp_path / "resumed", device=torch.device("cpu"),
            hooks=FitHooks(on_epoch_end=kill_after_epoch_2))  # fmt: skip
    assert len(pd.read_csv(tmp_path / "resumed" / "history.tsv", sep="\t")) == 2
    resumed = tiny_model()  # fresh weights: everything must come from the checkpoint
    fit(resumed, train, val, settings(), run_dir=tmp_path / "resumed", resume=True, **common)
    assert same_weights(weights_of(uninterrupted), weights_of(resumed))
    for name in ("best-loss.safetensors", "best-roc_auc.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_positive_and_negative_controls(tmp_path):
    """A planted signal is learned (AUC > 0.9); with permuted labels the test AUC stays near chance."""
    paths, labels = planted_volumes(tmp_path, 240, seed=7, signal=1.0)
    train_idx, test_idx = np.arange(120), np.arange(120, 240)
    aucs = {}
    for name, train_labels in (
        ("real", labels[train_idx]),
        ("permuted", np.random.default_rng(0).permutation(labels[train_idx])),
    ):
        seed_everything(0)
        model = tiny_model()
        train = Volumes([paths[i] for i in train_idx[:96]], train_labels[:96])
        val = Volumes([paths[i] for i in train_idx[96:]], train_labels[96:])
        fit(
            model,
            train,
            val,
            settings(epochs=8, batch_size=16),
            task=CLASSIFICATION,
            run_dir=tmp_path / name,
            device=torch.device("cpu"),
        )
        test = Volumes([paths[i] for i in test_idx], labels[test_idx])
        probabilities = predict(model, test, task=CLASSIFICATION, device=torch.device("cpu"))
        aucs[name] = evaluate.binary_metrics(labels[test_idx].astype(int), probabilities[:, 1], 0.5)["roc_auc"]
    assert aucs["real"] > 0.9, aucs
    assert abs(aucs["permuted"] - 0.5) <= 0.15, aucs


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")


def _subjects(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(n)],
            "y": (np.arange(n) % 3 == 0).astype(float),
            "site": rng.choice(["a", "b"], n),
        }
    )


def test_splits_are_subject_level_stratified_and_seeded():
    subjects = _subjects(40)
    settings_ = splits.SplitSettings(test_size=0.2, n_folds=5, val_size=0.2, seed=1, stratify=("target",))
    table = splits.make_splits(subjects, settings_, task=CLASSIFICATION)
    again = splits.make_splits(subjects, settings_, task=CLASSIFICATION)
    pd.testing.assert_frame_equal(table, again)
    test = set(table.loc[table["split"] == "test", "participant_id"])
    assert len(test) == 8
    for fold in range(5):
        members = splits.fold_members(table, fold)
        assert not set(members["train"]) & set(members["validation"])
        assert not (set(members["train"]) | set(members["validation"])) & test
        assert len(members["train"]) + len(members["validation"]) == 32
    validation = table[table["split"] == "validation"]
    assert validation["participant_id"].is_unique  # each development subject validates exactly once
    positives = subjects.set_index("participant_id")["y"]
    assert positives[list(test)].sum() in (2, 3)  # 14/40 positive: stratified share of 8
    assert leakage.check_subject_overlap(table)["result"] == "pass"


def test_too_few_subjects_names_the_minimum():
    settings_ = splits.SplitSettings(test_size=0.2, n_folds=5, val_size=0.2, seed=1, stratify=("target",))
    with pytest.raises(InputDataError, match="at least 13"):
        splits.make_splits(_subjects(8), settings_, task=CLASSIFICATION)


def test_changed_data_stops_reuse_of_splits(tmp_path):
    settings_ = splits.SplitSettings(test_size=0.2, n_folds=2, val_size=0.2, seed=1, stratify=("target",))
    subjects = _subjects(20)
    splits.load_or_make_splits(tmp_path, subjects, settings_, task=CLASSIFICATION, data_fingerprint="a",
                               resplit=False)  # fmt: skip
    _, reused = splits.load_or_make_splits(tmp_path, subjects, settings_, task=CLASSIFICATION,
                                               data_fingerprint="a", resplit=False)  # fmt: skip
    assert reused
    with pytest.raises(InputDataError, match="--resplit"):
        splits.load_or_make_splits(tmp_path, subjects, settings_, task=CLASSIFICATION, data_fingerprint="b",
                                   resplit=False)  # fmt: skip
    _, reused = splits.load_or_make_splits(tmp_path, subjects, settings_, task=CLASSIFICATION, data_fingerprint="b",
                                           resplit=True)  # fmt: skip
    assert not reused


def test_leakage_checks_catch_a_renamed_subject_and_site_confounds():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (6, *SHAPE)).astype(np.float32) + 5
    copy = base[0] + rng.normal(0, 0.02, SHAPE).astype(np.float32)  # sub-00 re-encoded under a new ID
    arrays = [*base, copy]
    images = pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(6)] + ["sub-99"],
        "source": [f"sub-{i:02d}/anat/x.nii.gz" for i in range(6)] + ["sub-99/anat/x.nii.gz"],
        "data_sha256": [f"h{i}" for i in range(6)] + ["h-other"],
    })  # fmt: skip
    table = pd.DataFrame({
        "participant_id": ["sub-00", "sub-99", "sub-01", "sub-02", "sub-03", "sub-04", "sub-05"],
        "split": ["test", "train", "train", "validation", "train", "validation", "train"],
        "fold": [pd.NA, 0, 0, 0, 0, 0, 0],
    })  # fmt: skip
    table["fold"] = table["fold"].astype("Int64")
    check, pairs = leakage.check_near_duplicates(images, arrays, table)
    assert check["result"] == "fail" and "across splits" in check["details"][0]
    assert pairs[0]["r"] > 0.95 and {pairs[0]["a"][:6], pairs[0]["b"][:6]} == {"sub-00", "sub-99"}
    identical = images.assign(data_sha256=["h0"] + [f"h{i}" for i in range(1, 6)] + ["h0"])
    assert leakage.check_identical_images(identical, table)["result"] == "fail"

    subjects = pd.DataFrame({"participant_id": [f"s{i}" for i in range(40)], "y": np.arange(40) % 2})
    subjects["site"] = np.where(subjects["y"] == 1, "A", "B")
    assert leakage.check_site_leakage(subjects, task=CLASSIFICATION, seed=0)["result"] == "warning"
    subjects["site"] = np.where(np.arange(40) % 4 < 2, "A", "B")
    assert leakage.check_site_leakage(subjects, task=CLASSIFICATION, seed=0)["result"] == "pass"


def test_threshold_and_metrics():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.45, 0.4, 0.8, 0.9])
    threshold = evaluate.choose_threshold(y, p)
    result = evaluate.evaluate_classification(y, np.stack([1 - p, p], axis=1), threshold=threshold,
                                              groups=[f"s{i}" for i in range(6)], seed=0)  # fmt: skip
    metrics = result["metrics"]
    assert metrics["roc_auc"] == pytest.approx(8 / 9)
    low, high = result["ci"]["roc_auc"]
    assert low <= metrics["roc_auc"] <= high
    assert sum(map(sum, result["confusion"])) == 6


def test_numpy_metrics_are_scikit_learns():
    """The bootstrap's NumPy metrics give scikit-learn's values: ties, one class, one predicted class included."""
    import warnings

    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, 30), rng.random(30).round(1)) for _ in range(20)]  # rounded: ties
    cases += [(np.zeros(8, int), rng.random(8)), (np.ones(8, int), rng.random(8)),
              (np.array([0, 1, 0, 1]), np.array([0.9, 0.95, 0.99, 0.97])),
              (np.array([1, 0, 1]), np.zeros(3))]  # fmt: skip
    for y, p in cases:
        for threshold in (0.5, 0.05):
            ours = evaluate.binary_metrics(y, p, threshold)
            predicted = (p >= threshold).astype(int)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                precision, recall, f1, _ = sk.precision_recall_fscore_support(y, predicted, labels=[0, 1],
                                                                              zero_division=np.nan)  # fmt: skip
                both = len(np.unique(y)) == 2
                theirs = {
                    "balanced_accuracy": sk.balanced_accuracy_score(y, predicted),
                    "accuracy": sk.accuracy_score(y, predicted), "sensitivity": recall[1], "specificity": recall[0],
                    "ppv": precision[1], "npv": precision[0], "f1": f1[1], "mcc": sk.matthews_corrcoef(y, predicted),
                    "roc_auc": sk.roc_auc_score(y, p) if both else np.nan,
                    "pr_auc": sk.average_precision_score(y, p) if both else np.nan,
                    "brier": sk.brier_score_loss(y, p, pos_label=1) if both else np.mean((p - y) ** 2),
                }  # fmt: skip
            for key, value in theirs.items():
                np.testing.assert_allclose(ours[key], value, atol=1e-12, err_msg=f"{key} {y} {p} {threshold}")
    for _ in range(10):
        y, predicted = rng.normal(size=12), rng.normal(size=12)
        ours = evaluate.regression_metrics(y, predicted)
        np.testing.assert_allclose([ours["mae"], ours["rmse"], ours["r2"]],
                                   [sk.mean_absolute_error(y, predicted), sk.root_mean_squared_error(y, predicted),
                                    sk.r2_score(y, predicted)], atol=1e-12)  # fmt: skip
        from scipy.stats import pearsonr

        np.testing.assert_allclose(ours["pearson_r"], pearsonr(y, predicted)[0], atol=1e-12)


def test_cache_is_rebuilt_when_stale_or_corrupt(tmp_path, caplog):
    source = tmp_path / "sub-01_space-X_res-2_desc-preproc_T1w.nii.gz"
    nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)).to_filename(source)
    array, _ = cohort.cache_array(source, tmp_path / "cache")
    assert np.load(array).shape == (1, 4, 5, 6)
    with open(array, "r+b") as handle:  # corrupt a byte of the data
        handle.seek(-1, 2)
        handle.write(b"\x7f")
    cohort.cache_array(source, tmp_path / "cache")
    assert "corrupt" in caplog.text
    assert np.load(array).max() == 1.0
    nib.Nifti1Image(np.full((4, 5, 6), 2, np.float32), np.eye(4)).to_filename(source)  # the derivative changed
    cohort.cache_array(source, tmp_path / "cache")
    assert np.load(array).max() == 2.0


def test_target_lookup_and_task():
    manifest = pd.DataFrame({"participant_id": ["sub-1"], "age": [70.0], "session_age": [71.0]})
    assert cohort.target_values(manifest, "age").tolist() == [71.0]
    with pytest.raises(InputDataError, match="Columns found: age"):
        cohort.target_values(manifest, "diagnosis")
    assert class_labels(pd.Series(["AD", "CN", "CN"]), "CN") == ["AD", "CN"]


def test_package_refuses_tampering(tmp_path):
    from pipeline.learn.train import save_weights

    config = ModelConfig("conv5fc3", 2, (16, 16, 16), {"channels": [2, 2, 2, 2, 2], "hidden": [4]})
    weights = tmp_path / "w.safetensors"
    save_weights(build_model(config), weights)
    record = {"name": "diagnosis_conv5fc3", "task": "classification", "target": "diagnosis", "classes": ["CN", "AD"],
              "model": config.to_dict(), "input": {"resolution_mm": 4.0}, "training_subjects": []}  # fmt: skip
    folder = package.write_package(tmp_path / "models", record=record, weights={"fold-0.safetensors": weights},
                                   files={"config.json": {"seed": 1}})  # fmt: skip
    assert folder.name.startswith("diagnosis_conv5fc3_")
    _, networks = package.load_package(folder)
    assert len(networks) == 1
    model_json = folder / "model.json"
    edited = json.loads(model_json.read_text())
    edited["threshold"] = 0.1
    model_json.write_text(json.dumps(edited))
    with pytest.raises(InputDataError, match="edited after training"):
        package.read_package(folder)
    with pytest.raises(InputDataError, match="does not exist"):
        package.read_package(tmp_path / "nowhere")


def test_images_that_failed_quality_control_are_left_out_unless_asked(tmp_path):
    sources = [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in range(1, 5)]
    manifest = pd.DataFrame({"participant_id": [s.split("/")[0] for s in sources], "source": sources,
                             "diagnosis": ["AD", "CN", "AD", "CN"]})  # fmt: skip
    for source in sources:  # the model-resolution derivatives exist, failed image included
        path = cohort.model_input_path(tmp_path, source, 2.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    qc = pd.DataFrame({"source": sources, "qc_outlier": [False] * 4, "qc_verdict": ["pass", "fail", "flag", "pass"]})
    common = {"output_dir": tmp_path, "target": "diagnosis", "task": CLASSIFICATION, "positive_class": "AD",
              "resolution_mm": 2.0, "qc": qc, "exclude_qc_outliers": False}  # fmt: skip
    kept = cohort.build_cohort(manifest, **common)
    assert sources[1] not in set(kept.table["source"]) and len(kept.table) == 3  # a flagged image stays
    assert kept.excluded == [
        {
            "source": sources[1],
            "reason": "failed quality control (registration or brain extraction; --include-failed-qc keeps it)",
        }
    ]
    assert len(cohort.build_cohort(manifest, **common, include_failed_qc=True).table) == 4
    strict = cohort.build_cohort(manifest, **{**common, "exclude_qc_outliers": True})
    assert sorted(strict.table["source"]) == [sources[0], sources[3]]  # the flagged image only on request


def test_a_loss_that_becomes_nan_stops_training_and_keeps_nothing_of_that_epoch(planted, tmp_path):
    train, val = planted
    paths = list(train.paths)
    broken = tmp_path / "broken.npy"
    array = np.load(paths[3]).copy()
    array[0, 0, 0, 0] = np.inf  # e.g. a corrupted cached array
    np.save(broken, array)
    paths[3] = broken
    from pipeline.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"epoch 1: the training loss became nan .* lower --lr"):
        fit(tiny_model(), Volumes(paths, train.targets), val, settings(epochs=2), task=CLASSIFICATION,
            run_dir=tmp_path / "run",
            device=torch.device("cpu"))  # fmt: skip
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not list((tmp_path / "run").glob("best-*"))


def test_a_resident_cohort_gives_the_batches_of_the_memory_mapped_one(planted):
    """On a GPU the training volumes may stay in device memory; the batches (augmented too) are the same."""
    train, _ = planted
    resident = Volumes(train.paths, train.targets)
    assert not resident.make_resident(torch.device("cpu"), budget=1000)  # too large for the budget
    assert resident.make_resident(torch.device("cpu"), budget=1e9)
    for seed, kinds in ((1, ()), (2, ("affine", "intensity", "noise", "flip"))):
        x, y = train.batch([3, 0, 7], augment=kinds, seed=seed)
        x2, y2 = resident.batch([3, 0, 7], augment=kinds, seed=seed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    import pickle

    assert pickle.loads(pickle.dumps(resident))._resident is None  # shared with other ranks as paths


def test_the_near_duplicate_scan_on_projections_finds_what_the_exact_one_finds():
    """Beyond EXACT_MAX_IMAGES the residuals are compared on random projections and every candidate checked
    exactly: the same pairs are flagged, with the same (exact) correlations, and the median stays close."""
    from pipeline.learn import near_duplicates

    rng = np.random.default_rng(3)
    mean = rng.normal(5, 1, SHAPE).astype(np.float32)
    arrays = [mean + rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(300)]
    arrays.append(arrays[17] + rng.normal(0, 0.05, SHAPE).astype(np.float32))  # sub-017 again as sub-300
    arrays.append(arrays[42] * 1.01)  # rescaled: the same scan
    owners = [f"sub-{i:03d}" for i in range(len(arrays))]
    owners[5] = owners[4]  # two sessions of one participant are not a pair
    exact = near_duplicates.scan(arrays, owners, threshold=0.95)
    projected = near_duplicates.scan(arrays, owners, threshold=0.95, exact_max_images=10)
    assert not exact.projected and projected.projected
    assert [(i, j) for _, i, j in exact.pairs] == [(42, 301), (17, 300)] == [(i, j) for _, i, j in projected.pairs]
    assert [r for r, _, _ in projected.pairs] == pytest.approx([r for r, _, _ in exact.pairs], abs=1e-5)
    assert [t[1:] for t in projected.top[:2]] == [t[1:] for t in exact.top[:2]]  # the two copies
    assert [t[0] for t in projected.top[:2]] == pytest.approx([t[0] for t in exact.top[:2]], abs=1e-5)
    vectors = np.stack([near_duplicates.block_means(a) for a in arrays])
    residual = vectors - vectors.mean(axis=0)
    residual -= residual.mean(axis=1, keepdims=True)
    unit = residual / np.linalg.norm(residual, axis=1, keepdims=True)
    for (r, i, j), (best, _, _) in zip(projected.top[2:], exact.top[2:], strict=True):  # the nearest others
        assert r == pytest.approx(float(unit[i] @ unit[j]), abs=1e-5)  # an exact correlation, not an estimate
        assert best - 0.1 < r <= best + 1e-6
    assert exact.n_pairs == projected.n_pairs == len(arrays) * (len(arrays) - 1) // 2 - 1
    assert abs(projected.median - exact.median) < 0.02


def test_the_near_duplicate_scan_holds_blocks_not_pairs(monkeypatch):
    """Memory grows with the block, not with the number of pairs: a cohort many blocks long gives the same result."""
    from pipeline.learn import near_duplicates

    rng = np.random.default_rng(4)
    arrays = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(120)]
    arrays[7] = arrays[99].copy()
    owners = [f"sub-{i:03d}" for i in range(120)]
    whole = near_duplicates.scan(arrays, owners, threshold=0.95)
    monkeypatch.setattr(near_duplicates, "BLOCK_ROWS", 16)
    blocks = near_duplicates.scan(arrays, owners, threshold=0.95)
    assert [(i, j) for _, i, j in blocks.pairs] == [(7, 99)] == [(i, j) for _, i, j in whole.pairs]
    assert blocks.median == pytest.approx(whole.median)
    assert [(i, j) for _, i, j in blocks.top] == [(i, j) for _, i, j in whole.top]


def test_outer_folds_on_a_handful_of_participants_need_no_stratification():
    """Six participants, five outer folds, strata of two (binned ages): too small to stratify, so plain folds, every
    participant in one outer test fold (sklearn refuses to stratify when every stratum is smaller than the folds)."""
    import numpy as np
    import pandas as pd

    from pipeline.learn.registry import get_task
    from pipeline.learn.splits import SplitSettings, outer_split

    subjects = pd.DataFrame({"participant_id": [f"s{i}" for i in range(6)], "y": np.linspace(60, 80, 6)})
    key = pd.Series(["young", "young", "mid", "mid", "old", "old"])
    tests = [outer_split(subjects, key, SplitSettings(0.2, 2, 0.2, 0, ("target",), outer_folds=5, outer_test=k),
                         get_task("regression"))[1] for k in range(5)]  # fmt: skip
    assert sorted(np.concatenate(tests).tolist()) == list(range(6))
