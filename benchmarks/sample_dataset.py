"""Time and peak memory of generating the sample dataset (target: 40 subjects in under a minute).

Usage: python benchmarks/sample_dataset.py [--subjects 40] [--nprocs N]
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from pipeline.config import available_cpus
from pipeline.sample.generate import SampleOptions, write_sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--nprocs", type=int, default=available_cpus())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = write_sample_dataset(Path(tmp) / "bids", SampleOptions(n_subjects=args.subjects, n_jobs=args.nprocs))
        elapsed = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 1e6
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"subjects={summary['participants']} images={summary['images']} nprocs={args.nprocs}")
    print(f"wall_time_s={elapsed:.1f} per_image_s={elapsed / summary['images']:.2f} size_mb={size_mb:.0f}")
    print(f"peak_rss_mb parent={peak_self:.0f} worker={peak_children:.0f}")


if __name__ == "__main__":
    main()
