"""FLAIR co-registration and lesion segmentation: speed, accuracy, and a hand-written MONAI baseline beside them.

Usage: python benchmarks/lesions.py [--subjects 16] [--test 4] [--epochs 20] [--nprocs 2] [--work DIR]
                                    [--skip-baseline]

1. A 1 mm sample (``--subjects`` participants, one session each): T1w + 2D FLAIR (0.9 x 0.9 x 3 mm slices, the head
   moved up to 5 degrees and 6 mm against the T1w) and white-matter lesions with their masks; the last ``--test``
   participants are the new people, never seen in training.
2. ``bidsdl participant`` on all of them (``--lesion-masks`` for the training people): wall time per participant
   (T1w + FLAIR), peak memory of the process tree, the co-registration node's time per FLAIR, and the
   co-registration error against the generator's true motion (mean and largest displacement over the brain, mm).
3. bidsdl: ``group --task segmentation --inputs T1w FLAIR`` on the lesion masks (``--n-folds 1``), then
   ``participant --model`` and ``group --model --labels`` on the new people: Dice, lesion-wise recall and F1,
   absolute volume difference, in each T1w's grid.
4. Baseline, hand-written with MONAI, given the same two channels already co-registered (bidsdl's
   ``desc-preproc_T1w`` and ``space-T1w_desc-preproc_FLAIR``, each z-scored in the brain): 1.5 mm RAS, 64^3 patches
   1:1 around lesion / other voxels (RandCropByPosNegLabeld), a UNet (16-128 channels), Dice + CE, Adam 1e-3, trained
   for as long as bidsdl's training took; sliding-window inference, back to each T1w's grid; the same scores.

Targets (2 cores): co-registration <= 10 s per FLAIR, a participant with T1w + FLAIR <= 40 s, co-registration error
<= 1 mm. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import run_measured, train_for

from pipeline import derivatives
from pipeline.learn.labels import label_path
from pipeline.learn.tasks.segmentation import structure_scores
from pipeline.ops.images import transform_matrix_ras
from pipeline.sample.generate import LESION_DESC, LESIONS_DIR, SampleOptions, write_sample_dataset

BIN = Path(sys.executable).parent


def coregistration_errors(bids: Path, out: Path) -> list[tuple[str, float, float]]:
    """Per FLAIR: the mean and largest distance (mm) between where bidsdl's rigid transform and the truth send the
    T1w's brain voxels."""
    rows = []
    for flair in sorted(bids.glob("sub-*/ses-*/anat/*_FLAIR.nii.gz")):
        xfm = derivatives.named_path(out, flair.relative_to(bids).as_posix(), "xfm_reference")
        if not xfm.exists():
            continue
        truth = json.loads((bids / "sourcedata/truth" / flair.name.replace(".nii.gz", ".json")).read_text())
        t1w = next(flair.parent.glob("*_T1w.nii*"))
        mask = nib.load(bids / "sourcedata/truth" / f"{t1w.name.split('_T1w')[0]}_desc-brain_mask.nii.gz")
        ijk = np.argwhere(np.asanyarray(mask.dataobj) > 0)[::20]
        points = mask.affine @ np.c_[ijk, np.ones(len(ijk))].T
        estimated = transform_matrix_ras(sitk.ReadTransform(str(xfm))) @ points
        true = np.linalg.inv(np.asarray(truth["FLAIRToT1w"])) @ points
        distance = np.linalg.norm((estimated - true)[:3], axis=0)
        rows.append((flair.name, float(distance.mean()), float(distance.max())))
    return rows


def scores(bids: Path, predicted: dict[str, Path]) -> pd.DataFrame:
    """Case-wise lesion scores of predicted masks (each on its T1w's grid, as stored or reoriented to RAS as
    bidsdl's desc-preproc is) against the sample's, both compared in RAS."""
    rows = []
    for source, path in predicted.items():
        truth = nib.as_closest_canonical(nib.load(label_path(bids / LESIONS_DIR, source, LESION_DESC, "mask")))
        reference = np.asarray(truth.dataobj) > 0
        image = nib.as_closest_canonical(nib.load(path))
        spacing = [float(z) for z in image.header.get_zooms()[:3]]
        predicted_mask = (np.asarray(image.dataobj) > 0).astype(np.uint8)
        for score in structure_scores(predicted_mask, reference.astype(np.uint8), {1: "lesion"}, spacing):
            rows.append({"source": source, **score})
    return pd.DataFrame(rows)


def summary(label: str, table: pd.DataFrame) -> dict[str, float]:
    columns = ["dice", "lesion_recall", "lesion_precision", "lesion_f1", "avd_percent", "n_lesions_ref",
               "n_lesions_pred"]  # fmt: skip
    print(f"\n{label}: {len(table)} new people, in each T1w's grid")
    print(table[["source", *columns]].round(3).to_string(index=False))
    mean = {c: float(table[c].mean()) for c in columns[:5]}
    print("mean: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    return mean


def participant_level(bids: Path, work: Path, train: list[str], test: list[str], nprocs: int) -> None:
    out = work / "derivatives"
    for labels, extra in ((train, ["--lesion-masks", str(bids / LESIONS_DIR)]), (test, [])):
        seconds, peak, _ = run_measured([str(BIN / "bidsdl"), str(bids), str(out), "participant", "-w",
                                         str(work / "work"), "--nprocs", str(nprocs), "--participant-label", *labels,
                                         *extra])  # fmt: skip
        print(f"participant level: {len(labels)} participants (T1w + FLAIR) in {seconds:.0f} s = "
              f"{seconds / len(labels):.1f} s per participant at --nprocs {nprocs}, peak PSS {peak / 1024:.2f} GB")
    node_times = _node_times(work / "work", "coregister")
    if node_times:
        print(f"co-registration node: {np.mean(node_times):.1f} s per FLAIR (max {np.max(node_times):.1f}); "
              f"{len(node_times)} FLAIRs")
    errors = coregistration_errors(bids, out)
    means = [e[1] for e in errors]
    print(f"co-registration error: mean {np.mean(means):.2f} mm (largest mean {np.max(means):.2f}), largest "
          f"displacement {max(e[2] for e in errors):.2f} mm over {len(errors)} FLAIRs")


def _node_times(work: Path, node: str) -> list[float]:
    import gzip
    import pickle

    out = []
    for result in sorted(work.rglob(f"{node}/result_{node}.pklz")):
        with gzip.open(result) as handle:
            out.append(float(pickle.load(handle).runtime.duration))
    return out


def bidsdl_run(bids: Path, work: Path, train: list[str], test: list[str], epochs: int) -> dict[str, float]:
    out, new = work / "derivatives", work / "predicted"
    seconds, peak, _ = run_measured(
        [str(BIN / "bidsdl"), str(bids), str(out), "group", "-w", str(work / "work"), "--participant-label", *train,
         "--task", "segmentation", "--labels", str(bids / LESIONS_DIR), "--label-desc", LESION_DESC, "--inputs",
         "T1w", "FLAIR", "--n-folds", "1", "--epochs", str(epochs), "--test-size", "0.1"]
    )  # fmt: skip
    run = next((out / "learn").glob("target-*/arch-*"))
    history = pd.read_csv(run / "fold-0" / "history.tsv", sep="\t")
    package = next((out / "models").glob(f"{LESION_DESC}_*"))
    print(f"\nbidsdl training: {len(history)} epochs, {history['epoch_time_s'].mean():.1f} s/epoch, whole group "
          f"level {seconds / 60:.1f} min, peak PSS {peak / 1024:.2f} GB")
    print("post-processing chosen on validation: " + json.dumps(json.loads((package / "model.json").read_text())
                                                               .get("postprocessing", {})))  # fmt: skip
    run_measured([str(BIN / "bidsdl"), str(bids), str(new), "participant", "-w", str(work / "work"), "--nprocs", "2",
                  "--model", str(package), "--participant-label", *test])  # fmt: skip
    predicted = {
        p.relative_to(new).as_posix().replace(f"_desc-{LESION_DESC}_dseg.nii.gz", "_T1w.nii.gz"): p
        for p in new.rglob(f"*_desc-{LESION_DESC}_dseg.nii.gz")
        if "space-" not in p.name
    }
    return {**summary("bidsdl (T1w + FLAIR)", scores(bids, predicted)), "train_s": seconds}


def baseline_run(bids: Path, work: Path, train: list[str], test: list[str], seconds: float) -> dict[str, float]:
    """A hand-written MONAI lesion segmentation on bidsdl's two co-registered channels, time-boxed."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
        SaveImaged,
        Spacingd,
    )

    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = work / "derivatives"

    def items(labels: list[str]) -> list[dict[str, str]]:
        rows = []
        for label in labels:
            for t1w in sorted((bids / f"sub-{label}").rglob("*_T1w.nii*")):
                source = t1w.relative_to(bids).as_posix()
                flair = next(t1w.parent.glob("*_FLAIR.nii.gz")).relative_to(bids).as_posix()
                rows.append({
                    "t1w": str(derivatives.named_path(out, source, "preproc")),
                    "flair": str(derivatives.named_path(out, flair, "preproc_reference")),
                    "label": str(label_path(bids / LESIONS_DIR, source, LESION_DESC, "mask")), "source": source,
                })  # fmt: skip
        return rows

    keys = ["t1w", "flair", "label"]
    common = [
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(1.5, 1.5, 1.5), mode=("bilinear", "bilinear", "nearest")),
        NormalizeIntensityd(keys=["t1w", "flair"], nonzero=True), ConcatItemsd(keys=["t1w", "flair"], name="image"),
    ]  # fmt: skip
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(64, 64, 64), pos=1, neg=1,
                                  num_samples=2)  # fmt: skip
    loader = DataLoader(CacheDataset(items(train), Compose([*common, crop]), num_workers=0), batch_size=1, shuffle=True)
    network = UNet(3, 2, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    steps, trained = train_for(loader, network, loss, optimizer, seconds)
    print(f"\nbaseline training: {steps} steps of 2 patches of 64^3 in {trained / 60:.1f} min")
    inference = Compose(common)
    post_dir = work / "baseline"
    post = Compose([
        Invertd(keys="pred", transform=inference, orig_keys="t1w", nearest_interp=True, to_tensor=True),
        SaveImaged(keys="pred", output_dir=str(post_dir), output_postfix="lesion", separate_folder=False,
                   resample=False),
    ])  # fmt: skip
    predicted = {}
    network.eval()
    for item in items(test):
        data = inference({k: item[k] for k in keys})
        with torch.no_grad():
            logits = sliding_window_inference(data["image"][None], (64, 64, 64), 2, network, overlap=0.25)
        data["pred"] = torch.argmax(logits, dim=1, keepdim=True)[0]
        post(data)
        predicted[item["source"]] = post_dir / (Path(item["t1w"]).name.split(".")[0] + "_lesion.nii.gz")
    return {**summary("baseline (hand-written MONAI, the same two channels)", scores(bids, predicted)),
            "train_s": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="reuse this folder (sample + preprocessing)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-bidsdl", action="store_true", help="with --work: the baseline alone")
    parser.add_argument("--baseline-minutes", type=float, default=None,
                        help="the baseline's training time (default: as long as bidsdl's group level took)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-lesions-"))
    bids = work / "bids"
    if not (bids / "dataset_description.json").exists():
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=17, two_session_fraction=0.0,
                                                 flair_fraction=1.0, lesion_fraction=1.0, n_jobs=2))  # fmt: skip
    labels = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*"))
    train, test = labels[: -args.test], labels[-args.test :]
    print(f"work folder: {work}; training {len(train)} participants, testing {len(test)}")
    if not list((work / "derivatives").glob("sub-*.html")):
        participant_level(bids, work, train, test, args.nprocs)
    results = {} if args.skip_bidsdl else {"bidsdl": bidsdl_run(bids, work, train, test, args.epochs)}
    if not args.skip_baseline:
        budget = args.baseline_minutes * 60 if args.baseline_minutes else results["bidsdl"]["train_s"]
        results["baseline"] = baseline_run(bids, work, train, test, budget)
    print("\n" + json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
