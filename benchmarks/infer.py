"""Inference benchmark: per-subject time from the preprocessed model input to prediction + attribution maps,
and the peak resident memory of the process doing it.

    python benchmarks/infer.py                          # a 5-fold Conv5-FC3 package on the 2 mm grid (untrained)
    python benchmarks/infer.py --model M --inputs DIR   # a real package and model-resolution derivatives

Prints figures; asserts nothing (targets on 2 cores: at most 3 s and 1.5 GB per subject).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learn import ensemble, package
from pipeline.learn.models import ModelConfig, build_model
from pipeline.learn.tasks.image import inference
from pipeline.learn.train import save_weights
from pipeline.reports.figures import attribution_overlay

SHAPE = (77, 95, 82)  # the 2 mm model grid of the bundled template


def synthetic_package(folder: Path, n_folds: int = 5) -> Path:
    config = ModelConfig("conv5fc3", 2, SHAPE)
    weights = {}
    for fold in range(n_folds):
        torch.manual_seed(fold)
        weights[f"fold-{fold}.safetensors"] = folder / f"w{fold}.safetensors"
        save_weights(build_model(config), weights[f"fold-{fold}.safetensors"])
    record = {
        "name": "benchmark", "task": "classification", "target": "diagnosis", "classes": ["CN", "AD"],
        "positive_class": "AD", "threshold": 0.5, "model": config.to_dict(),
        "input": {"space": "MNI152NLin2009aSym", "resolution_mm": 2.0, "res": "2", "shape": list(SHAPE)},
        "training_subjects": [], "test_subjects": [], "metrics": {}, "data": {},
    }  # fmt: skip
    return package.write_package(folder / "models", record=record, weights=weights, files={})


def synthetic_inputs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"sub-{i:02d}_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz")
        data = rng.normal(0, 1, SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", help="model package (repeat for an ensemble)")
    parser.add_argument("--inputs", type=Path, help="folder searched for *_res-*_desc-preproc_T1w.nii.gz")
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    folders = args.model or [synthetic_package(tmp)]
    if args.inputs:
        inputs = sorted(args.inputs.rglob("*_res-*_desc-preproc_T1w.nii.gz"))[: args.subjects]
    else:
        inputs = synthetic_inputs(tmp, args.subjects)
    start = time.perf_counter()
    models = ensemble.load_models(folders)
    load_s = time.perf_counter() - start
    times = []
    for path in inputs:
        start = time.perf_counter()
        array = inference.check_input_image(models[0].record, path)
        result = inference.infer(models, array)
        img = nib.load(path)
        for name, volume in (("saliency", result.saliency), ("gradcam", result.gradcam)):
            nib.save(nib.Nifti1Image(volume, img.affine), tmp / f"{path.name}.{name}.nii.gz")
        attribution_overlay(array, {"saliency": result.saliency, "Grad-CAM": result.gradcam})
        times.append(time.perf_counter() - start)
    networks = sum(len(m.networks) for m in models)
    print(f"models: {len(models)} package(s), {networks} network(s); loading and checking: {load_s:.2f} s (once)")
    print(f"per subject (input check, prediction, saliency + Grad-CAM, maps written, overlay figure), {args.threads} "
          f"threads: median {np.median(times):.2f} s, max {max(times):.2f} s over {len(times)} subject(s)")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
