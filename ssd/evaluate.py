"""``ssd-eval``: sample quality without downloaded weights.

FID needs Inception weights that cannot be downloaded here, so the default feature space is
a small classifier trained once on the reference data's labels and cached (Fashion-MNIST:
its 60,000 labelled training images; an image folder: its class subfolders). On those
features: a Fréchet distance ("classifier FD", *not comparable with published FID*), KID,
and precision/recall; on the pixels: multi-scale sliced Wasserstein distance. FID proper is
computed when ``--inception-weights`` names a local TorchScript Inception file (the
``inception-2015-12-05.pt`` of NVIDIA's StyleGAN2-ADA/3 metrics).

The reference set is held out from the classifier's training where the data allows it
(Fashion-MNIST's 10,000 test images).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import metrics
from .data import FASHION_MNIST, DataError, decode_image, find_images, read_idx
from ssd_core.errors import UserError
from ssd_core.files import cache_root, write_atomic

CLASSIFIER_VERSION = 1  # bump when the network or its training changes: caches are keyed by it
FEATURES = 128
INCEPTION_FEATURES = 2048
MIN_IMAGES = 4  # precision/recall's k=3 nearest neighbours need 4 points in each set (KID and FD 2)
MIN_SIZE = 8  # px: the classifier pools twice and SWD's pyramid stops at 8
TRAIN_BATCH = 128


@dataclass
class ImageSet:
    """Images uint8 [N, C, S, S], with labels where known."""

    images: np.ndarray
    source: str
    labels: np.ndarray | None = None

    def as_float(self) -> np.ndarray:
        """float32 in [0, 1]."""
        return self.images.astype(np.float32) / 255.0


# --------------------------------------------------------------------------- data
def fashion_mnist_split(split: str) -> ImageSet:
    """Fashion-MNIST ``train`` or ``test`` (t10k) images padded to 32 px, with labels."""
    folder = FASHION_MNIST.parent
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return ImageSet(np.ascontiguousarray(images), f"fashion-mnist {split}", labels.astype(np.int64))


def read_folder(folder, channels: int | None = None, size: int | None = None, limit: int | None = None) -> ImageSet:
    """Image files under ``folder`` (sorted), decoded as the training data is (16-bit and float
    images rescaled; see :func:`ssd.data.decode_image`); two or more class subfolders become
    labels. Images are converted to ``channels`` (1: grey, else RGB) and resized to ``size``
    where given. Any unreadable file is a one-line :class:`DataError` naming it."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}")
    paths = [p for p in find_images(folder) if not p.name.startswith(("grid", "preview", "."))]
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise DataError(f"no images in {folder}")
    classes = sorted({p.parent.name for p in paths if p.parent != folder})
    labelled = len(classes) > 1 and all(p.parent != folder for p in paths)
    images = []
    for path in paths:
        image = decode_image(path, "L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, np.uint8)
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    try:
        stacked = np.stack(images)
    except ValueError:
        raise DataError(f"images in {folder} differ in size; pass them through one resize first") from None
    if min(stacked.shape[-2:]) < MIN_SIZE:
        raise DataError(f"images in {folder} are {stacked.shape[-1]}x{stacked.shape[-2]} px; "
                        f"ssd-eval needs at least {MIN_SIZE}x{MIN_SIZE}")
    labels = np.array([classes.index(p.parent.name) for p in paths]) if labelled else None
    return ImageSet(stacked, str(folder), labels)


def reference_sets(ref: str, limit: int | None = None) -> tuple[ImageSet | None, ImageSet]:
    """``(labelled set to train the classifier on, or None; the reference set)``."""
    if ref == "fashion-mnist":
        test = fashion_mnist_split("test")
        if limit is not None:
            test = ImageSet(test.images[:limit], test.source, test.labels[:limit])
        return fashion_mnist_split("train"), test
    data = read_folder(ref, limit=limit)
    return (data if data.labels is not None else None), data


# --------------------------------------------------------------------------- classifier
class FeatureNet(nn.Module):
    """A small CNN classifier (about 7 MMACs per 32-px image, so it trains in minutes on a
    CPU); its penultimate layer [N, 128] is the feature space."""

    def __init__(self, channels: int, classes: int):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*conv(channels, 16), nn.AvgPool2d(2), *conv(16, 32), *conv(32, 32),
                                  nn.AvgPool2d(2), *conv(32, 64), *conv(64, 64), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(256, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: np.ndarray, batch: int = 500) -> np.ndarray:
        """Features [N, 128] of uint8 images [N, C, S, S]."""
        self.eval()
        out = [self.body(torch.from_numpy(images[i:i + batch]).float() / 127.5 - 1.0).numpy()
               for i in range(0, len(images), batch)]
        return np.concatenate(out).astype(np.float64)


def train_classifier(data: ImageSet, epochs: int = 2, seed: int = 0, log=print) -> FeatureNet:
    """Train :class:`FeatureNet` on labelled uint8 images (AdamW, one-cycle, random flips)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = FeatureNet(data.images.shape[1], int(data.labels.max()) + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    batch = min(TRAIN_BATCH, len(data.images))
    steps = epochs * (len(data.images) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=max(steps, 1))
    net.train()
    for epoch in range(epochs):
        order = rng.permutation(len(data.images))
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            x = torch.from_numpy(data.images[index]).float() / 127.5 - 1.0
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            x[flip] = x[flip].flip(-1)
            loss = nn.functional.cross_entropy(net(x), torch.from_numpy(data.labels[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.3f}")
    return net.eval()


def accuracy(net: FeatureNet, data: ImageSet) -> float:
    with torch.no_grad():
        logits = torch.cat([net(torch.from_numpy(data.images[i:i + 500]).float() / 127.5 - 1.0)
                            for i in range(0, len(data.images), 500)])
    return float((logits.argmax(1).numpy() == data.labels).mean())


def classifier_for(train: ImageSet, cache: Path | None = None, log=print) -> FeatureNet:
    """The classifier for a labelled set: loaded from the cache (keyed by the data, labels
    and :data:`CLASSIFIER_VERSION`), or trained once and cached (safetensors)."""
    from safetensors.torch import load_file, save

    digest = hashlib.sha256(train.images.tobytes() + train.labels.tobytes()
                            + str(CLASSIFIER_VERSION).encode()).hexdigest()[:16]
    path = (cache or cache_root()) / f"classifier-{digest}.safetensors"
    net = FeatureNet(train.images.shape[1], int(train.labels.max()) + 1)
    if path.is_file():
        try:
            net.load_state_dict(load_file(path))
            return net.eval()
        except Exception:  # a damaged cache file is retrained, not fatal
            log(f"retraining the classifier: cannot load {path}")
    log(f"training the feature classifier on {train.source} ({len(train.images)} images, once; cached in {path.parent})")
    if len(train.images) < TRAIN_BATCH:
        log(f"warning: {len(train.images)} labelled images are under one training batch ({TRAIN_BATCH}); "
            "the classifier metrics (FD, KID, precision/recall) will be rough")
    net = train_classifier(train, log=log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save({k: v.contiguous() for k, v in net.state_dict().items()}))
    except OSError as err:
        log(f"warning: cannot cache the classifier in {path.parent}: {err.strerror or err}")
    return net


# --------------------------------------------------------------------------- Inception
def inception_features(images: np.ndarray, weights: Path, batch: int = 100) -> np.ndarray:
    """2048-d pool features of NVIDIA's TorchScript Inception (``inception-2015-12-05.pt``),
    which takes uint8 RGB [N, 3, H, W] and resizes to 299 itself. The file is code, so it is
    loaded through :func:`ssd_core.torchscript_check.load_checked` (Inception's operators only)."""
    from ssd_core.torchscript_check import INCEPTION_OPS, load_checked

    try:
        data = Path(weights).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read --inception-weights {weights}: {err.strerror or err}") from None
    model = load_checked(data, f"--inception-weights {weights}", INCEPTION_OPS)
    rgb = images if images.shape[1] == 3 else np.repeat(images, 3, axis=1)
    with torch.no_grad():
        out = [model(torch.from_numpy(rgb[i:i + batch]), return_features=True).numpy()
               for i in range(0, len(rgb), batch)]
    return np.concatenate(out).astype(np.float64)


def checked_inception_features(images: np.ndarray, weights: Path) -> np.ndarray:
    """:func:`inception_features`, or a one-line :class:`UserError` when the model fails on
    the images or gives anything but finite features [N, 2048]."""
    try:
        features = inception_features(images, weights)
    except UserError:
        raise
    except Exception as err:  # a foreign TorchScript file can fail in any way when called
        raise UserError(f"--inception-weights {weights} failed on the images: "
                        f"{(str(err) or type(err).__name__).splitlines()[0][:200]}") from None
    expected = (len(images), INCEPTION_FEATURES)
    if features.shape != expected:
        raise UserError(f"--inception-weights {weights} gave features of shape {list(features.shape)}, "
                        f"not {list(expected)}: is it inception-2015-12-05.pt?")
    if not np.isfinite(features).all():
        raise UserError(f"--inception-weights {weights} gave NaN or infinite features: the weights are damaged")
    return features


# --------------------------------------------------------------------------- the report
def evaluate(samples: ImageSet, train: ImageSet | None, reference: ImageSet, inception: Path | None = None,
             cache: Path | None = None, log=print) -> dict:
    """Every metric this data allows, as a JSON-able dict."""
    n = min(len(samples.images), len(reference.images))
    if n < MIN_IMAGES:
        raise DataError(f"ssd-eval needs at least {MIN_IMAGES} samples and {MIN_IMAGES} reference images "
                        f"(precision/recall use 3 nearest neighbours); got {len(samples.images)} samples "
                        f"and {len(reference.images)} reference images")
    result = {"samples": samples.source, "n_samples": len(samples.images), "reference": reference.source,
              "n_reference": len(reference.images)}
    if train is not None:
        net = classifier_for(train, cache, log)
        real, fake = net.features(reference.images), net.features(samples.images)
        kid, kid_std = metrics.kernel_inception_distance(real, fake, subset_size=min(1000, n))
        precision, recall = metrics.precision_recall(real[:n], fake[:n])
        result["classifier"] = {
            "note": "features of a small classifier trained on the reference labels: NOT comparable with published FID",
            "accuracy_on_reference": accuracy(net, reference) if reference.labels is not None else None,
            "fd": metrics.frechet_distance(real, fake), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall,
        }
    result["swd"] = metrics.sliced_wasserstein(reference.as_float()[:n], samples.as_float()[:n])
    if inception is not None:
        result["fid"] = metrics.frechet_distance(checked_inception_features(reference.images, inception),
                                                 checked_inception_features(samples.images, inception))
    return result


def format_report(result: dict) -> str:
    lines = [f"{result['n_samples']} samples from {result['samples']} against {result['n_reference']} "
             f"reference images ({result['reference']})", "", "| metric | value |", "|---|---|"]
    if "classifier" in result:
        c = result["classifier"]
        lines += [f"| classifier FD (not FID) | {c['fd']:.3f} |",
                  f"| classifier KID (x1e3) | {1e3 * c['kid']:.2f} ± {1e3 * c['kid_std']:.2f} |",
                  f"| precision / recall | {c['precision']:.3f} / {c['recall']:.3f} |"]
        if c["accuracy_on_reference"] is not None:
            lines.append(f"| classifier accuracy on the reference | {c['accuracy_on_reference']:.3f} |")
    swd = result["swd"]
    levels = ", ".join(f"{k}px {v:.1f}" for k, v in swd.items() if k != "mean")
    lines.append(f"| SWD x1e3 (mean; {levels}) | {swd['mean']:.1f} |")
    if "fid" in result:
        lines.append(f"| FID (Inception) | {result['fid']:.3f} |")
    return "\n".join(lines)


def write_report(path: Path, result: dict) -> None:
    write_atomic(Path(path), json.dumps(result, indent=1).encode())
