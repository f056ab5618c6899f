"""``bidsdl-export MODEL_DIR --format {torchscript,onnx}``: a standalone network from a model package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import EXIT_USAGE, BidsdlError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bidsdl-export",
        description="Export a bidsdl model package (its fold ensemble) as one standalone network. The export "
        "is run against the package before it is kept; a JSON sidecar beside it records the input contract, "
        "the classes, the threshold and the measured difference.",
    )
    parser.add_argument("model_dir", type=Path, help="the model package (OUTPUT_DIR/models/<name>)")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx"), help="what to write")
    parser.add_argument(
        "-o", "--output", type=Path, help="file to write (default: beside the package, <name>.pt or <name>.onnx)"
    )
    parser.add_argument("--version", action="version", version=f"bidsdl {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    from ..learn.export import main_export

    try:
        return main_export(args.model_dir, args.format, args.output)
    except BidsdlError as exc:
        print(f"bidsdl-export: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
