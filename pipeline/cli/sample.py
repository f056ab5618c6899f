"""``bidsdl-sample OUT_DIR``: write the sample BIDS dataset."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..config import available_cpus
from ..errors import EXIT_CANT_CREATE, EXIT_OK, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bidsdl-sample",
        description="Write a realistic synthetic BIDS dataset (T1w, labels, known ground truth).",
    )
    parser.add_argument("out_dir", type=Path, help="new folder to write the dataset into")
    parser.add_argument("--subjects", type=int, default=10, help="number of participants (default 10)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--effect-strength", type=float, default=1.0,
                        help="scale of the diagnosis effect on anatomy (default 1.0; 0 = none)")  # fmt: skip
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.1,
        help="share of participants whose anatomy disagrees with their recorded diagnosis (default 0.1); the others' "
        "effect is graded: no model can reach an AUC of 1 (sourcedata/generation.json gives the best possible one)",
    )
    parser.add_argument("--individual-variation", type=float, default=1.0,
                        help="how much people differ apart from the disease (default 1: head size by sex, the "
                        "ventricles' and hippocampi's own sizes, a smooth shape of each head; 0 = every head is the "
                        "template's; 2 = twice as much)")  # fmt: skip
    parser.add_argument(
        "--two-session-fraction",
        type=float,
        default=0.3,
        help="fraction of participants with a second session (default 0.3)",
    )
    parser.add_argument(
        "--large-fov-fraction",
        type=float,
        default=0.3,
        help="fraction of images whose field of view reaches the neck and shoulders (270 mm head to foot "
        "instead of 212; default 0.3)",
    )
    parser.add_argument(
        "--duplicate-subject",
        action="store_true",
        help="plant a copy of one participant's image under a new participant ID",
    )
    parser.add_argument("--confound-site", action="store_true", help="plant a site that predicts the diagnosis")
    parser.add_argument("--corrupt-subject", action="store_true", help="plant a truncated .nii.gz for one participant")
    parser.add_argument(
        "--voxel-scale",
        type=float,
        default=1.0,
        help="multiply every voxel size (e.g. 3 for small, fast test data; default 1)",
    )
    parser.add_argument(
        "--label-prefix",
        default="",
        help="letters before each participant number (e.g. 'ext' gives sub-ext01): a second cohort whose IDs "
        "cannot be mistaken for the first's",
    )
    _add_contrast_options(parser)
    parser.add_argument("--nprocs", type=int, default=available_cpus(), help="worker processes")
    parser.add_argument("--version", action="version", version=f"bidsdl-sample {__version__}")
    return parser


def _add_contrast_options(parser: argparse.ArgumentParser) -> None:
    """The FLAIRs and lesions of a multi-contrast sample."""
    parser.add_argument(
        "--flair-fraction",
        type=float,
        default=0.0,
        help="fraction of participants whose sessions also have a 2D FLAIR (3 mm axial slices, the head moved "
        "against the T1w; the true FLAIR-to-T1w transform in sourcedata/truth/; default 0)",
    )
    parser.add_argument(
        "--lesion-fraction",
        type=float,
        default=0.0,
        help="fraction of participants with white-matter lesions (dark on the T1w, bright on the FLAIR), their "
        "masks in the derivatives dataset derivatives/lesions (desc-lesion_mask, each T1w's grid; default 0)",
    )
    parser.add_argument(
        "--unfamiliar",
        nargs="+",
        default=[],
        choices=("flair", "inverted", "infant", "scanner"),
        metavar="KIND",
        help="add one participant per KIND whose T1w is unlike the others, for checking a model's distribution "
        "check: flair (a FLAIR stored as T1w), inverted (the contrast inverted), infant (a smaller head, white matter "
        "as bright as grey), scanner (another scanner's non-linear intensity response)",
    )


def _bad_option(args: argparse.Namespace) -> str:
    """What is wrong with the options argparse let through ("" when nothing)."""
    if not args.label_prefix.isalnum() and args.label_prefix:
        return "--label-prefix must be letters and digits only (a BIDS label)"
    for option in ("large_fov_fraction", "flair_fraction", "lesion_fraction", "label_noise"):
        if not 0 <= getattr(args, option) <= 1:
            return f"--{option.replace('_', '-')} must be between 0 and 1"
    if not 0 <= args.individual_variation <= 2:
        return "--individual-variation must be between 0 and 2"
    if args.subjects < 1:
        return "--subjects must be at least 1"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    from ..sample.generate import SampleOptions, write_sample_dataset

    parser = build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        print(f"bidsdl-sample: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version, or a usage error argparse reports itself
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    problem = _bad_option(args)
    if problem:
        print(f"bidsdl-sample: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = SampleOptions(
        n_subjects=args.subjects, seed=args.seed, effect_strength=args.effect_strength, label_noise=args.label_noise,
        individual_variation=args.individual_variation, two_session_fraction=args.two_session_fraction,
        large_fov_fraction=args.large_fov_fraction, duplicate_subject=args.duplicate_subject,
        confound_site=args.confound_site, corrupt_subject=args.corrupt_subject, voxel_scale=args.voxel_scale,
        label_prefix=args.label_prefix, flair_fraction=args.flair_fraction, lesion_fraction=args.lesion_fraction,
        unfamiliar=tuple(args.unfamiliar), n_jobs=max(1, args.nprocs),
    )  # fmt: skip
    start = time.monotonic()
    try:
        summary = write_sample_dataset(args.out_dir, options)
    except FileExistsError:
        print(
            f"bidsdl-sample: error: {args.out_dir} exists and is not empty; give a new folder.",
            file=sys.stderr,
        )
        return EXIT_CANT_CREATE
    except OSError as exc:
        print(f"bidsdl-sample: error: cannot write {args.out_dir}: {exc}", file=sys.stderr)
        return EXIT_CANT_CREATE
    print(
        f"Sample dataset: {args.out_dir} ({summary['participants']} participants, "
        f"{summary['images']} images, {time.monotonic() - start:.1f} s)"
    )
    if summary["planted"]:
        print(f"Planted problems: {summary['planted']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
