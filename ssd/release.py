"""A weights-only release of a training checkpoint: the EMA weights (fp16 by default) and
``state.json``, a few MB to commit or ship. ``ssd-export``, ``ssd-sample`` and ``ssd-eval``
read it like any checkpoint; it cannot be resumed.

    python -m ssd.release runs/shipped --out models/fashion-mnist
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from .checkpoint import STATE_FILE, TENSOR_FILES, FileHash, write_dir_atomic, read_checkpoint
from .errors import cli_errors
from .schema import to_json


def release(source, out, half: bool = True) -> Path:
    """Write ``out`` (a checkpoint folder) with only the EMA weights of ``source``."""
    checkpoint = read_checkpoint(source, parts=("ema",))
    dtype = torch.float16 if half else torch.float32
    ema = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in checkpoint.tensors["ema"].items()}
    blob = save_safetensors(ema)
    name = TENSOR_FILES["ema"]
    state = replace(checkpoint.state, optimizer=None, rng={},
                    files={name: FileHash(len(blob), hashlib.sha256(blob).hexdigest())})
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dir_atomic(out.parent, out.name, {name: blob, STATE_FILE: json.dumps(to_json(state), indent=1).encode()})


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
