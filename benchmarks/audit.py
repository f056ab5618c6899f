"""Participant-level audit throughput on the sample dataset.

Usage: python benchmarks/audit.py [--subjects 10] [--nprocs N]
Prints the wall time of `bidsdl participant` (cold work dir, then a cached re-run); asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.cli.run import main as bidsdl
from pipeline.config import available_cpus
from pipeline.sample.generate import SampleOptions, write_sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--nprocs", type=int, default=available_cpus())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bids, out = Path(tmp) / "bids", Path(tmp) / "out"
        summary = write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, n_jobs=args.nprocs))
        argv = [str(bids), str(out), "participant", "--nprocs", str(args.nprocs), "-q"]
        for label in ("cold", "cached"):
            start = time.perf_counter()
            code = bidsdl(argv)
            elapsed = time.perf_counter() - start
            print(
                f"{label}: exit={code} images={summary['images']} wall_time_s={elapsed:.1f} "
                f"per_image_s={elapsed / summary['images']:.2f}"
            )


if __name__ == "__main__":
    main()
