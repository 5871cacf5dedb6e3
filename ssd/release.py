"""A weights-only release of a training checkpoint: the EMA weights (fp16 by default) and
``state.json``, a few MB to commit or ship. ``ssd-export``, ``ssd-sample`` and ``ssd-eval``
read it like any checkpoint; it cannot be resumed.

    python -m ssd.release runs/shipped --out models/fashion-mnist
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import read_checkpoint, save_weights_only
from .errors import cli_errors


def release(source, out, half: bool = True) -> Path:
    """Write ``out`` (a checkpoint folder) with only the EMA weights of ``source``."""
    checkpoint = read_checkpoint(source, parts=("ema",))
    dtype = torch.float16 if half else torch.float32
    ema = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in checkpoint.tensors["ema"].items()}
    return save_weights_only(out, checkpoint.config, checkpoint.step, ema, checkpoint.state.train)


@cli_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run folder or checkpoint folder")
    parser.add_argument("--out", required=True, help="the release folder to write")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights")
    args = parser.parse_args(argv)
    print(f"wrote {release(args.source, args.out, half=not args.fp32)}")


if __name__ == "__main__":
    main()
