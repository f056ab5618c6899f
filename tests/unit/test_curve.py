"""The learning curve (:mod:`pipeline.learn.curve`): nested subsets of each fold's training participants."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.learn import baseline, curve
from pipeline.learn.registry import get_task


def _table(n: int = 80, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, list[dict[str, list[str]]]]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(float)
    x = rng.normal(size=(n, 20)) + 1.2 * y[:, None] * (np.arange(20) < 3)
    images = pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "y": y})
    ids = list(images["participant_id"])
    test, dev = ids[:20], ids[20:]
    members = [{"train": [p for p in dev if p not in dev[k::3]], "validation": dev[k::3], "test": test}
               for k in range(3)]  # fmt: skip
    return images, x, members


def test_subsets_are_nested_and_keep_the_classes_balanced():
    targets = {f"s{i}": float(i % 3 == 0) for i in range(30)}
    sizes = []
    previous: set[str] = set()
    for share in curve.FRACTIONS:
        subset = set(curve.training_subset(list(targets), targets, share, discrete=True, seed=4))
        assert previous <= subset
        positives = sum(targets[p] for p in subset)
        assert abs(positives / len(subset) - 1 / 3) < 0.1
        previous, sizes = subset, [*sizes, len(subset)]
    assert sizes[-1] == 30 and sizes == sorted(sizes) and sizes[0] < 10


def test_the_curve_climbs_with_more_training_participants_and_ends_at_the_baseline():
    task = get_task("classification")
    images, x, members = _table()
    y = images["y"].to_numpy()
    features = baseline.tabular_features(x)
    points = curve.learning_curve(task, images, members, y=y, n_classes=2, seed=0, features=features)
    assert [p["fraction"] for p in points] == list(curve.FRACTIONS)
    assert [round(p["n_train"]) for p in points] == [10, 20, 30, 40]
    test_rows = images[images["participant_id"].isin(members[0]["test"])]
    scored = curve.scored(task, test_rows, points, "roc_auc", 0)
    assert scored[-1]["value"] > 0.8 and scored[-1]["ci"][0] < scored[-1]["value"] < scored[-1]["ci"][1]
    # the full point is the baseline itself (same folds, same selection)
    from pipeline.learn import controls

    fitted = controls.fit_baseline(task, images, members, y=y, n_classes=2, seed=0, features=features)
    np.testing.assert_allclose(points[-1]["test_output"], fitted["test_output"])
    assert points[-1]["threshold"] == fitted["threshold"]


def test_too_few_of_a_class_leaves_the_small_points_out_and_the_outlook_says_what_the_curve_means():
    task = get_task("classification")
    images, x, members = _table(n=32)
    points = curve.learning_curve(task, images, members, y=images["y"].to_numpy(), n_classes=2, seed=0,
                                  features=baseline.tabular_features(x))  # fmt: skip
    assert points and points[0]["fraction"] > 0.25  # 8 training participants: a quarter has 1 of each class
    flat = [{"fraction": 0.5, "n_train": 20, "value": 0.75, "metric": "roc_auc"},
            {"fraction": 1.0, "n_train": 40, "value": 0.76, "metric": "roc_auc"}]  # fmt: skip
    said = curve.outlook(flat, True)
    assert not said["climbing"] and "flat" in said["text"] and "20 to 40" in said["text"]
    assert curve.outlook(flat[1:], True) is None
    mae = [{**flat[0], "value": 9.0, "metric": "mae"}, {**flat[1], "value": 7.0, "metric": "mae"}]
    assert curve.outlook(mae, False)["climbing"]


def test_the_default_design_nests_small_cohorts_and_says_why():
    from pipeline.learn.study.nested import NESTED_BELOW, auto_outer_folds

    k, why = auto_outer_folds(80, 36, n_folds=5, test_size=0.2)
    assert k == 5 and "every participant tested once" in why and "16 test participants" in why
    k, why = auto_outer_folds(NESTED_BELOW, 120, n_folds=5, test_size=0.2)
    assert k == 0 and "one held-out test set" in why
    assert auto_outer_folds(40, None, n_folds=5, test_size=0.2)[0] == 5  # values: no class to run short of
    assert auto_outer_folds(30, 7, n_folds=5, test_size=0.2)[0] == 0  # even 3 outer folds leave 4 of a class < 6
    assert auto_outer_folds(30, 7, n_folds=3, test_size=0.2)[0] == 5  # 5 outer folds leave 5 of it >= 4
    k, why = auto_outer_folds(50, 20, n_folds=5, test_size=0.2, refused="a segmentation (label maps)")
    assert k == 0 and "segmentation" in why
