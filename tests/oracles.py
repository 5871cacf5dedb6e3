"""Small reference computations only the tests use: the plain forms of product metrics
(FD of two Gaussians or two feature sets, KID's mean and spread) and a TorchScript
inspection (device constants left in a graph)."""
from __future__ import annotations

import numpy as np

from ssd.metrics import FrechetReference, gaussian, kid_subsets


def frechet_distance_gaussians(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|² + tr(C1 + C2 - 2 (C1^½ C2 C1^½)^½)``, with symmetric square roots
    (equal to the usual ``tr sqrt(C1 C2)`` form, without a non-symmetric ``sqrtm``)."""
    root1 = FrechetReference(mu1, cov1).root()
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    cross = np.sqrt(middle.clip(0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d]."""
    return FrechetReference(*gaussian(features1)).distance(features2)


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, subsets: int = 50,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`kid_subsets`."""
    values = kid_subsets(features1, features2, subsets, subset_size, seed)
    return float(np.mean(values)), float(np.std(values))


def device_constants(module) -> list[str]:
    """Device constants left in a module's (inlined) graph: none after the rewrite."""
    graph = module.inlined_graph  # keep a reference: its nodes die with it
    nodes = graph.findAllNodes("prim::Constant", recurse=True)
    return [str(node).strip() for node in nodes if node.output().type().kind() == "DeviceObjType"]
