"""A weights-only release of a training checkpoint: the EMA weights (fp16 by default) and
``state.json``, a few MB to commit or ship. ``ssd-export``, ``ssd-sample`` and ``ssd-eval``
read it like any checkpoint; it cannot be resumed.

    python -m ssd.release runs/shipped --out models/fashion-mnist
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import read_checkpoint, resolve_checkpoint, weights_only_files
from ssd_core.errors import cli_errors
from ssd_core.files import write_atomic
from ssd_core.outputs import replaced_folder


def release(source, out, half: bool = True, force: bool = False) -> Path:
    """Write ``out``, a new release folder with only the EMA weights of ``source`` (a run or
    checkpoint folder). An existing release there is replaced only with ``force``; nothing
    else ever is (see ``ssd_core.outputs``)."""
    source, out = Path(source), Path(out)
    checkpoint_dir = resolve_checkpoint(source)
    with replaced_folder(out, "release", "ssd.release", sources=(source, checkpoint_dir), replace=force) as stage:
        checkpoint = read_checkpoint(checkpoint_dir, parts=("ema",))
        dtype = torch.float16 if half else torch.float32
        ema = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in checkpoint.tensors["ema"].items()}
        for name, blob in weights_only_files(checkpoint.config, checkpoint.step, ema, checkpoint.state.train).items():
            write_atomic(stage.path / name, blob)
        stage.commit()
    return out


@cli_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run folder or checkpoint folder")
    parser.add_argument("--out", required=True, help="the release folder to write")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights")
    parser.add_argument("--force", action="store_true", help="replace an existing release in --out (only a release)")
    args = parser.parse_args(argv)
    print(f"wrote {release(args.source, args.out, half=not args.fp32, force=args.force)}")


if __name__ == "__main__":
    main()
