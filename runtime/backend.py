"""The interface every backend implements (``Backend``), its errors, and the helpers that
make loading and releasing safe. The backends themselves are listed in ``registry`` (one
module each: ``onnxruntime_backend``, ``openvino_backend``, ``torchscript_backend``,
``tensorrt_backend``).

A backend owns the array type the sampling state lives in (``to_array`` / ``to_numpy``):
ONNX Runtime keeps numpy arrays on the host; TorchScript on CUDA keeps torch tensors and
TensorRT device buffers on the GPU, so the whole step (network and posterior update) stays
on the device. A backend holds what it loaded (sessions, modules, device memory) until
:meth:`Backend.close`; a failure part-way through its construction releases what it had
already taken.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ssd_core.bundle import Bundle, BundleError, route_contract, step_contract
from ssd_core.errors import UserError
from ssd_core.method import COEFFICIENTS


class BackendError(UserError):
    """A backend or device that is not installed or cannot serve this bundle."""


def release_all(steps) -> None:
    """Call every release step even when one fails, then raise the first failure."""
    first = None
    for step in steps:
        try:
            step()
        except Exception as err:
            first = first or err
    if first is not None:
        raise first


@contextlib.contextmanager
def closing_on_error(resource):
    """Close ``resource`` if the block fails, then raise the block's error (not a cleanup
    error: the first failure is the one worth reading)."""
    try:
        yield resource
    except BaseException:
        with contextlib.suppress(Exception):
            resource.close()
        raise


class Backend:
    """Interface: ``run(route, x, t) -> x0_pred`` on the backend's own array type, or with
    fused step graphs (``fused``) ``run_step(route, x, t, coef, z) -> (x_s, x0_pred)``;
    :meth:`close` releases what the backend holds."""

    name = "base"
    file_format = ""
    precision = "fp32"
    closed = False
    choice: str | None = None  # with ``backend="auto"``: which was picked, and why (one line)
    precision_choice: str | None = None  # with ``precision="auto"``: which was picked, and why (one line)

    def __init__(self, bundle: Bundle, device: str, fused: bool = False):
        self.bundle, self.device, self.fused = bundle, device, fused
        channels = bundle.config.model.in_channels
        self.out_shapes = {name: (channels, r.out_size, r.out_size) for name, r in bundle.routes.items()}
        self.files = {name: name for name in bundle.routes}  # route -> the file it runs, for errors

    def close(self) -> None:
        """Release what the backend holds (see ``_release``); closing twice is harmless."""
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        """What :meth:`close` releases; each backend its own."""

    def check_open(self) -> None:
        """One line instead of a crash when a closed backend is used."""
        if self.closed:
            raise BackendError(f"backend {self.name!r} is closed")

    def contract(self, route: str, batch: int | None = None) -> dict:
        """The manifest's I/O contract of a route's graph (its step graph's when fused); with
        ``batch``, that of the graph fixed to that batch size."""
        r, (low, high) = self.bundle.routes[route], self.bundle.batch_range
        axis = batch if batch is not None else low if low == high else "batch"
        contract = route_contract(route, r.in_size, r.out_size, self.bundle.config.model.in_channels, axis)
        return step_contract(contract) if self.fused else contract

    def check_outputs(self, route: str, outputs, batch: int):
        """``outputs`` if they are what the route promises (one, or two when fused, of
        [batch, C, out, out]); a graph whose outputs differ is refused naming its file."""
        want = (batch, *self.out_shapes[route])
        shapes = [tuple(getattr(out, "shape", ())) for out in outputs]
        if len(shapes) != (2 if self.fused else 1) or any(shape != want for shape in shapes):
            raise BackendError(f"{self.files[route]} returned shapes {shapes}; route {route} must return "
                               f"{2 if self.fused else 1} of {list(want)}")
        return outputs

    def to_array(self, array: np.ndarray) -> Any:
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def step_inputs(self, plan, batch: int) -> list[tuple[Any, Any]]:
        """Every step's ``(t, coef)`` inputs at ``batch`` for the fused step graphs, in the
        backend's array type, made once per batch size of a sampling call (each distinct
        timestep once); :meth:`release_step_inputs` when the call is done."""
        timesteps = {t: self.to_array(np.full(batch, t, np.float32)) for t in {step.t for step in plan}}
        return [(timesteps[step.t], self.to_array(step.coefficients())) for step in plan]

    def release_step_inputs(self, inputs) -> None:
        """Release what :meth:`step_inputs` made (here: nothing, the arrays are garbage-collected)."""

    def stage_noise(self, array: np.ndarray) -> Any:
        """Where the loop's white noise goes before a step reads it (default: ``to_array``)."""
        return self.to_array(array)

    def run(self, route: str, x: Any, t: Any) -> Any:
        raise NotImplementedError

    def run_step(self, route: str, x: Any, t: Any, coef: Any, z: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def providers(self) -> list[str]:
        return [self.device]

    def warmup(self, batch: int) -> None:
        """Run every graph once so that first-call costs are paid before timing starts."""
        self.check_open()
        channels = self.bundle.config.model.in_channels
        t = self.to_array(np.zeros(batch, np.float32))
        zeros = lambda size: self.to_array(np.zeros((batch, channels, size, size), np.float32))
        for name, route in self.bundle.routes.items():
            if self.fused:
                coef = self.to_array(np.zeros(len(COEFFICIENTS[route.kind]), np.float32))
                self.run_step(name, zeros(route.in_size), t, coef, zeros(route.out_size))
            else:
                self.run(name, zeros(route.in_size), t)


def use_step_graphs(bundle: Bundle, backend_format: str, fused: bool | None) -> bool:
    """Whether to sample with fused step graphs: where the bundle has them unless
    ``fused=False``; ``fused=True`` on a bundle without them is refused."""
    if fused is None:
        return bundle.has_step_graphs(backend_format)
    if fused:
        for name in bundle.routes:
            bundle.route_file(name, backend_format, step=True)  # BundleError naming what is missing
    return bool(fused)


def first_line(err: Exception, last: bool = False) -> str:
    """One line of an error's message: the first, or the last (TorchScript's own, after its trace)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return lines[-1 if last else 0][:300]


def load_error(path: str, backend: str, err: Exception) -> BundleError:
    """A file that passed its hash check but that the backend refuses to load."""
    return BundleError(f"{backend} cannot load {path}: {first_line(err)}")


def run_error(path: str, backend: str, err: Exception) -> BackendError:
    """A graph that loaded but fails when run (shapes it lied about, memory it cannot get)."""
    return BackendError(f"{backend} failed running {path}: {first_line(err, last=backend == 'TorchScript')}")


def check_declared_io(inputs, outputs, contract: dict, path: str) -> None:
    """Refuse a graph whose declared ``inputs``/``outputs`` ([(name, type, shape)], type as
    ONNX Runtime spells it, ``tensor(float)``) differ from the manifest's contract: names,
    float32, and every static dimension (axis 0, the batch, may be symbolic)."""
    for kind, declared, wanted in (("inputs", inputs, contract["inputs"]),
                                   ("outputs", outputs, contract["outputs"])):
        got = {name: (dtype, list(shape)) for name, dtype, shape in declared}
        if sorted(got) != sorted(io["name"] for io in wanted):
            raise BundleError(f"{path} has {kind} {sorted(got)}; the manifest's contract for "
                              f"{contract['name']} says {[io['name'] for io in wanted]}")
        for io in wanted:
            dtype, shape = got[io["name"]]
            fits = len(shape) == len(io["shape"]) and all(
                have == want if isinstance(have, int) else axis == 0
                for axis, (have, want) in enumerate(zip(shape, io["shape"])))
            if dtype != "tensor(float)" or not fits:
                raise BundleError(f"{path}: {io['name']} is {dtype} {shape}; the manifest's contract for "
                                  f"{contract['name']} says float32 {list(io['shape'])}")
