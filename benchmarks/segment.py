"""Segmentation: bidsdl's default against a MONAI-tutorial baseline, side by side, on the sample's labelled heads.

Usage: python benchmarks/segment.py [--subjects 20] [--test 4] [--minutes 20] [--epochs N] [--work DIR]
                                    [--skip-baseline] [--skip-bidsdl]

1. A 1 mm sample (``--subjects`` heads, one session each, necks in some fields of view) with its reference
   labels (lateral ventricles, hippocampi, thalami), preprocessed by ``bidsdl participant``; the last
   ``--test`` participants are the new people, never seen in training.
2. bidsdl: ``group --task segmentation`` on the others (its defaults: 1.5 mm template grid, 64^3 patches, one
   in three on a structure, small residual UNet, Dice + CE, sliding window), ``--n-folds 1``; then
   ``participant --model`` on the new people (labels in each T1w's grid + meshes) and ``group --model
   --labels`` (Dice, HD95, volume difference in each T1w's grid). Printed: time per epoch and to the best
   epoch, peak memory of the training process tree, inference time per head, test scores per structure.
3. Baseline (MONAI's 3D segmentation tutorial, adapted to T1w): each raw T1w and its labels to RAS at 1.5 mm,
   intensities z-scored in the head, cropped to the foreground; training on 96^3 patches drawn 1:1 around
   labelled / unlabelled voxels (RandCropByPosNegLabeld), residual UNet (16-256 channels, 2 residual units),
   Dice + CE, Adam 1e-4, for ``--minutes`` of training; sliding-window inference (96^3, overlap 0.25), then
   inverted back to each native grid (Invertd); the same new people, the same scores.

Targets (2 cores): bidsdl's mean Dice >= 0.87 and HD95 <= 2 mm on the new people in each T1w's grid, inference
with meshes <= 15 s per head, <= 4 GB; and better than the baseline in the same training time.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import tree_memory_mb

from pipeline.learn.labels import label_path
from pipeline.learn.tasks.segmentation import structure_scores
from pipeline.sample.generate import LABEL_DESC, LABELS_DIR, SampleOptions, write_sample_dataset


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Wall time (s), peak PSS of the process tree (MB) and the output of a command."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def watch() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_memory_mb(process.pid)[1])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    watcher.join()
    if process.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({process.returncode})")
    return time.monotonic() - started, peak[0], output


def train_for(loader, network, loss, optimizer, seconds: float) -> tuple[int, float]:
    """Train a baseline on ``loader``'s batches (``image``, ``label``) for ``seconds``; the steps taken and the
    time it took."""
    started, steps = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        for batch in loader:
            network.train()
            optimizer.zero_grad()
            loss(network(batch["image"]), batch["label"]).backward()
            optimizer.step()
            steps += 1
            if time.monotonic() - started >= seconds:
                break
    return steps, time.monotonic() - started


def native_scores(bids: Path, predicted: dict[str, Path], names: dict[int, str]) -> pd.DataFrame:
    """Case-wise scores of predicted label images (each on its T1w's grid) against the sample's labels."""
    rows = []
    for source, path in predicted.items():
        reference = nib.load(label_path(bids / LABELS_DIR, source, LABEL_DESC))
        image = nib.load(path)
        spacing = [float(z) for z in image.header.get_zooms()[:3]]
        for score in structure_scores(
            np.asarray(image.dataobj).astype(np.uint8), np.asarray(reference.dataobj).astype(np.uint8), names, spacing
        ):
            rows.append({"source": source, **score})
    return pd.DataFrame(rows)


def summary(label: str, scores: pd.DataFrame) -> dict[str, float]:
    per_structure = scores.groupby("structure", sort=False)[["dice", "hd95_mm", "volume_difference_ml"]].mean()
    print(f"\n{label}: test set in each T1w's grid ({scores['source'].nunique()} heads)")
    print(per_structure.round(3).to_string())
    mean = {"dice": float(scores["dice"].mean()), "hd95_mm": float(scores["hd95_mm"].mean())}
    print(f"mean Dice {mean['dice']:.3f}, mean HD95 {mean['hd95_mm']:.2f} mm")
    return mean


def bidsdl_run(bids: Path, work: Path, train: list[str], test: list[str], epochs: int) -> dict[str, object]:
    bin_dir = Path(sys.executable).parent
    out, new = work / "derivatives", work / "predicted"
    seconds, peak, _ = run_measured(
        [str(bin_dir / "bidsdl"), str(bids), str(out), "group", "-w", str(work / "work"), "--participant-label",
         *train, "--task", "segmentation", "--labels", str(bids / LABELS_DIR), "--label-desc", LABEL_DESC,
         "--n-folds", "1", "--epochs", str(epochs), "--test-size", "0.1"]
    )  # fmt: skip
    run = next((out / "learn").glob("target-*/arch-*"))
    history = pd.read_csv(run / "fold-0" / "history.tsv", sep="\t")
    results = json.loads((run / "results.json").read_text())
    best = results["folds"][0]["best"]["dice"]
    package = next((out / "models").iterdir())
    to_best = history["epoch_time_s"][: best["epoch"]].sum() / 60
    print(f"\nbidsdl training: {len(history)} epochs, {history['epoch_time_s'].mean():.1f} s/epoch, best validation "
          f"Dice {best['value']:.3f} at epoch {best['epoch']} (~{to_best:.1f} min), whole group level "
          f"{seconds / 60:.1f} min, peak PSS {peak / 1024:.2f} GB")  # fmt: skip
    infer_seconds, infer_peak, _ = run_measured(
        [str(bin_dir / "bidsdl"), str(bids), str(new), "participant", "-w", str(work / "work"), "--nprocs", "1",
         "--model", str(package), "--participant-label", *test]
    )  # fmt: skip
    import gzip
    import pickle

    node_times = []  # the segmentation node of each head (Nipype's own record of its run)
    for result in sorted((work / "work").rglob("anat_segmentation_wf/segment/result_segment.pklz")):
        with gzip.open(result) as handle:
            node_times.append(float(pickle.load(handle).runtime.duration))
    per_head = np.mean(node_times) if node_times else infer_seconds / max(len(test), 1)
    print(f"bidsdl inference: {per_head:.1f} s per head (sliding window, back to the T1w grid, meshes, volumes), "
          f"participant run {infer_seconds:.0f} s for {len(test)} heads with cached preprocessing, peak PSS "
          f"{infer_peak / 1024:.2f} GB")  # fmt: skip
    record = json.loads((package / "model.json").read_text())
    names = {int(e["index"]): e["name"] for e in record["labels"]}
    predicted = {
        p.relative_to(new).as_posix().replace(f"_desc-{LABEL_DESC}_dseg.nii.gz", "_T1w.nii.gz"): p
        for p in new.rglob(f"*_desc-{LABEL_DESC}_dseg.nii.gz")
        if "space-" not in p.name
    }
    scores = summary("bidsdl", native_scores(bids, predicted, names))
    return {**scores, "train_s": seconds, "peak_gb": peak / 1024, "infer_s": per_head}


def baseline_run(bids: Path, work: Path, train: list[str], test: list[str], minutes: float) -> dict[str, object]:
    """MONAI's 3D segmentation tutorial on raw T1w (RAS, 1.5 mm, 96^3 pos/neg patches), time-boxed."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        CropForegroundd,
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

    def items(labels: list[str]) -> list[dict[str, str]]:
        out = []
        for label in labels:
            for image in sorted((bids / f"sub-{label}").rglob("*_T1w.nii*")):  # the sample writes some .nii
                source = image.relative_to(bids).as_posix()
                seg = label_path(bids / LABELS_DIR, source, LABEL_DESC)
                out.append({"image": str(image), "label": str(seg), "source": source})
        return out

    common = [
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 1.5), mode=("bilinear", "nearest")),
        NormalizeIntensityd(keys="image", nonzero=True),
        CropForegroundd(keys=["image", "label"], source_key="image"),
    ]
    crop = RandCropByPosNegLabeld(
        keys=["image", "label"], label_key="label", spatial_size=(96, 96, 96), pos=1, neg=1, num_samples=2
    )
    training = Compose([*common, crop])
    dataset = CacheDataset(items(train), training, num_workers=0)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0)
    n_classes = 7
    network = UNet(3, 1, n_classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), 1e-4)
    steps, trained = train_for(loader, network, loss, optimizer, minutes * 60)
    print(f"\nbaseline training: {steps} steps of 2 patches of 96^3 in {trained / 60:.1f} min")
    inference = Compose([*common[:-1], CropForegroundd(keys=["image"], source_key="image")])
    post_dir = work / "baseline"
    post = Compose([
        Invertd(keys="pred", transform=inference, orig_keys="image", nearest_interp=True, to_tensor=True),
        SaveImaged(keys="pred", output_dir=str(post_dir), output_postfix="seg", separate_folder=False, resample=False),
    ])  # fmt: skip
    test_items = items(test)
    predicted, seconds = {}, []
    network.eval()
    for item in test_items:
        begun = time.monotonic()
        data = inference({"image": item["image"], "label": item["label"]})
        with torch.no_grad():
            logits = sliding_window_inference(data["image"][None], (96, 96, 96), 2, network, overlap=0.25)
        data["pred"] = torch.argmax(logits, dim=1, keepdim=True)[0]
        post(data)
        seconds.append(time.monotonic() - begun)
        name = Path(item["image"]).name.split(".")[0] + "_seg.nii.gz"
        predicted[item["source"]] = post_dir / name
    print(f"baseline inference: {np.mean(seconds):.1f} s per head (sliding window + Invertd)")
    names = {1: "Left-Lateral-Ventricle", 2: "Right-Lateral-Ventricle", 3: "Left-Hippocampus",
             4: "Right-Hippocampus", 5: "Left-Thalamus", 6: "Right-Thalamus"}  # fmt: skip
    scores = summary("baseline (MONAI tutorial)", native_scores(bids, predicted, names))
    return {**scores, "train_s": trained, "infer_s": float(np.mean(seconds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=20.0, help="the baseline's training time")
    parser.add_argument("--epochs", type=int, default=8, help="bidsdl's epochs (pick them to fit --minutes)")
    parser.add_argument("--work", type=Path, default=None, help="reuse this folder (sample + preprocessing)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-bidsdl", action="store_true")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-segment-"))
    bids = work / "bids"
    if not (bids / "dataset_description.json").exists():
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=42, two_session_fraction=0.0,
                                                 n_jobs=2))  # fmt: skip
    labels = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*"))
    train, test = labels[: -args.test], labels[-args.test :]
    out = work / "derivatives"
    preprocessed = (out / "dataset_description.json").exists() and list(out.glob("sub-*.html"))
    if not args.skip_bidsdl and not preprocessed:  # the baseline reads the raw T1w
        seconds, _, _ = run_measured([str(Path(sys.executable).parent / "bidsdl"), str(bids), str(out),
                                      "participant", "-w", str(work / "work"), "--nprocs", "2"])  # fmt: skip
        print(f"participant level: {len(labels)} heads in {seconds / 60:.1f} min")
    print(f"work folder: {work}; training {len(train)} participants, testing {len(test)}")
    results = {}
    if not args.skip_bidsdl:
        results["bidsdl"] = bidsdl_run(bids, work, train, test, args.epochs)
    if not args.skip_baseline:
        results["baseline"] = baseline_run(bids, work, train, test, args.minutes)
    print("\n" + json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
