"""The ``gsrq`` command line.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gsrq.errors import GsrqError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "calibrate": ("gsrq.calibration", "learn GSRQ codebooks for a model's KV cache"),
    "eval": ("gsrq.eval.cli", "perplexity, reconstruction and LongBench evaluation"),
    "demo": ("gsrq.demo", "calibrate SmolLM2-135M on wiki text and compare caches"),
    "info": ("gsrq.kernels", "GPU, compute capability and CUDA kernels found"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsrq", description="Gain-Shape Residual Quantization of KV caches")
    from gsrq import __version__

    parser.add_argument("--version", action="version", version=f"gsrq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except GsrqError as e:
        print(f"gsrq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
