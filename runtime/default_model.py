"""The bundle ``ssd-run`` samples when it is given none: the shipped model, ready to run
(torch-free).

The wheel carries the shipped Fashion-MNIST model twice, as package data of ``ssd_runtime``:

- ``models/fashion-mnist-bundle``: the verified ONNX bundle (route and fused step graphs,
  shared weights, manifest with hashes; 7.7 MB), which ``ssd-run`` with no BUNDLE samples
  directly: no export, no torch, no subprocess, nothing written anywhere but ``--out``;
- ``models/fashion-mnist``: the trainer's release it was exported from (fp16 EMA weights and
  ``state.json``), for ``ssd-export`` and ``ssd-sample`` users.

``tests/test_default_model.py`` exports the release afresh and checks that the result equals
the packaged bundle (see :func:`bundle_differences`), so the two never drift. To rebuild it
after retraining: ``ssd-export runtime/models/fashion-mnist --out
runtime/models/fashion-mnist-bundle --engine onnx --force``.
"""
from __future__ import annotations

from pathlib import Path

from ssd_core.errors import UserError

MODEL_PACKAGE = "ssd_runtime"
MODEL_NAME = "fashion-mnist"
MODEL_FILES = ("state.json", "ema.safetensors")
BUNDLE_NAME = f"{MODEL_NAME}-bundle"


def packaged_model():
    """The shipped release folder inside the ``ssd_runtime`` package (a Traversable)."""
    from importlib import resources

    return resources.files(MODEL_PACKAGE) / "models" / MODEL_NAME


def packaged_bundle() -> Path:
    """The shipped model's bundle inside the installed ``ssd_runtime`` package, or one line
    saying the installation is incomplete."""
    from importlib import resources

    from ssd_core.bundle import MANIFEST

    folder = Path(str(resources.files(MODEL_PACKAGE) / "models" / BUNDLE_NAME))
    if not (folder / MANIFEST).is_file():
        raise UserError(f"no BUNDLE given and the packaged model's bundle is missing ({folder}); reinstall "
                        "ssd-diffusion, or pass a BUNDLE")
    return folder


# the manifest fields that say where and how a bundle was made, not what it computes
PROVENANCE = ("created_by", "source", "options", "fingerprint", "verification", "sizes")


def bundle_differences(shipped: dict, fresh: dict) -> list[str]:
    """How two manifests of one model differ in what they compute: everything but
    :data:`PROVENANCE` and each route's ``verification`` must be equal, file hashes included."""
    def computed(manifest: dict) -> dict:
        kept = {key: value for key, value in manifest.items() if key not in PROVENANCE}
        kept["routes"] = [{k: v for k, v in route.items() if k != "verification"} for route in manifest["routes"]]
        return kept

    a, b = computed(shipped), computed(fresh)
    return [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
