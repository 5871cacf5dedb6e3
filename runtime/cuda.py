"""The little of CUDA the TensorRT backend needs, through ``cuda-python`` (no torch):
device buffers, one stream, copies, page-locked staging for uploads, device properties and
CUDA graphs. Whatever is created here has its release: :meth:`DeviceBuffer.free`,
:meth:`Stream.close` (cudaStreamDestroy), :meth:`PinnedStaging.close` (cudaFreeHost,
cudaEventDestroy), :func:`destroy_graph_exec` (cudaGraphExecDestroy); a captured graph is
destroyed (cudaGraphDestroy) as soon as it is instantiated.

cuda-python's runtime functions return ``(error, *values)``; :func:`check` turns a failure
into one :class:`CudaError` line naming the call. Imported only by the ``tensorrt`` backend
(the others take just :func:`local_device`, which needs nothing installed).

Status: written against cuda-python's documented ``cuda.bindings.runtime`` API (12.x/13.x;
``cuda.cudart`` before 12.6) and exercised in CI only against a stand-in
(``tests/fake_tensorrt.py``); it has not run on a GPU. Without a driver, cuda-python's
``cudaGetDeviceCount`` answers ``cudaErrorInsufficientDriver`` (said as such).
"""
from __future__ import annotations

import ctypes
import importlib
import os
from dataclasses import dataclass

import numpy as np

from ssd_core.checks import MAX_RANK
from ssd_core.errors import UserError

from .backend import release_all


class CudaError(UserError):
    """cuda-python is missing, no GPU is visible, or a CUDA call failed."""


def import_cudart():
    """``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise CudaError("backend 'tensorrt' needs cuda-python for device memory: pip install 'ssd-diffusion[trt]'")


def check(cudart, result, call: str):
    """The values of a cuda-python call; :class:`CudaError` naming ``call`` on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != int(cudart.cudaError_t.cudaSuccess):
        name = getattr(error, "name", str(error))
        raise CudaError(f"CUDA call {call} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def local_device(environ=os.environ) -> int:
    """The CUDA device index of this process: ``LOCAL_RANK`` where a launcher such as torchrun
    sets it (one GPU per process of a machine), else 0."""
    text = environ.get("LOCAL_RANK")
    if text is None:
        return 0
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_RANK):
        raise CudaError(f"LOCAL_RANK={text[:24]!r}; expected a non-negative integer (this process's GPU on its "
                        "machine)")
    return int(text)


NO_GPU = {  # what cudaGetDeviceCount's errors mean here
    "cudaErrorInsufficientDriver": "no NVIDIA driver, or one older than this CUDA runtime "
                                   "(cudaGetDeviceCount: cudaErrorInsufficientDriver)",
    "cudaErrorNoDevice": "no NVIDIA GPU is visible (cudaGetDeviceCount: cudaErrorNoDevice; "
                         "check CUDA_VISIBLE_DEVICES)",
    "cudaSuccess": "no NVIDIA GPU is visible (cudaGetDeviceCount found none)",
}


def device_properties(cudart, device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``; one line if there is none."""
    error, *values = cudart.cudaGetDeviceCount()
    name = getattr(error, "name", str(error))
    if int(error) != int(cudart.cudaError_t.cudaSuccess) or not values or not values[0]:
        raise CudaError(f"{NO_GPU.get(name, f'CUDA cannot list the GPUs ({name})')}: the tensorrt backend and "
                        "engine builds need an NVIDIA GPU with its driver")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


@dataclass
class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``; freed by :meth:`free`."""

    cudart: object
    ptr: int
    nbytes: int

    @classmethod
    def allocate(cls, cudart, nbytes: int) -> "DeviceBuffer":
        ptr = check(cudart, cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        return cls(cudart, int(ptr), int(nbytes))

    def free(self) -> None:
        if self.ptr:
            check(self.cudart, self.cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


@dataclass(frozen=True)
class DeviceArray:
    """A float32 array on the device: a view of ``shape`` at ``ptr`` (the backend owns the
    memory). What the sampling loop holds between steps on the tensorrt backend."""

    ptr: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4


class Stream:
    """One CUDA stream and the copies the backend makes on it; destroyed by :meth:`close`."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.handle = check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def close(self) -> None:
        """Destroy the stream (work still queued completes first, by CUDA's rules); a second
        call does nothing."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(self.cudart, self.cudart.cudaStreamDestroy(handle), "cudaStreamDestroy")

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        direction = getattr(self.cudart.cudaMemcpyKind, kind)
        check(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, direction, self.handle), "cudaMemcpyAsync")

    def upload(self, dst: int, host: np.ndarray) -> None:
        """Host to device (``host`` must stay alive until the stream passes the copy)."""
        self.copy_from_host(dst, host.ctypes.data, host.nbytes)

    def copy_from_host(self, dst: int, src: int, nbytes: int) -> None:
        self._copy(dst, src, nbytes, "cudaMemcpyHostToDevice")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        if dst != src:
            self._copy(dst, src, nbytes, "cudaMemcpyDeviceToDevice")

    def download(self, array: DeviceArray) -> np.ndarray:
        """Device to host, then wait: a new numpy array."""
        host = np.empty(array.shape, np.float32)
        self._copy(host.ctypes.data, array.ptr, array.nbytes, "cudaMemcpyDeviceToHost")
        self.synchronize()
        return host

    def synchronize(self) -> None:
        check(self.cudart, self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def capture(self, work) -> object:
        """Record ``work()`` (calls enqueued on this stream) as an instantiated CUDA graph, to
        be released with :func:`destroy_graph_exec`. The captured graph itself is destroyed
        once instantiated (or once ``work`` failed): the executable does not need it."""
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart, cudart.cudaStreamBeginCapture(self.handle, mode), "cudaStreamBeginCapture")
        try:
            work()
        except BaseException:  # leave capture mode, drop what was captured, report the failure
            destroy_graph(cudart, self._end_capture())
            raise
        graph = self._end_capture()
        try:
            return check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            destroy_graph(cudart, graph)

    def _end_capture(self):
        return check(self.cudart, self.cudart.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")

    def launch(self, graph_exec) -> None:
        check(self.cudart, self.cudart.cudaGraphLaunch(graph_exec, self.handle), "cudaGraphLaunch")


class PinnedStaging:
    """Uploads through page-locked host memory: ``slots`` buffers of ``nbytes`` used in turn,
    each with an event recorded after the copy that reads it, so a slot is refilled only once
    its previous upload has finished (the copy is a true asynchronous DMA, which it is not
    from numpy's pageable memory). :meth:`close` frees the buffers and events."""

    def __init__(self, cudart, nbytes: int, slots: int = 2):
        self.cudart, self.nbytes, self.next = cudart, int(nbytes), 0
        self.buffers: list[int] = []
        self.events: list = []
        try:
            for _ in range(slots):
                self.buffers.append(int(check(cudart, cudart.cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost")))
                self.events.append(check(cudart, cudart.cudaEventCreate(), "cudaEventCreate"))
        except BaseException:
            self.close()
            raise

    def upload(self, stream: Stream, dst: int, host: np.ndarray) -> None:
        """Copy ``host`` (float32, at most ``nbytes``) to device address ``dst`` on ``stream``."""
        host = np.ascontiguousarray(host, np.float32)
        if host.nbytes > self.nbytes:
            raise CudaError(f"an upload of {host.nbytes} bytes exceeds the {self.nbytes}-byte staging buffer")
        slot, self.next = self.next, (self.next + 1) % len(self.buffers)
        check(self.cudart, self.cudart.cudaEventSynchronize(self.events[slot]), "cudaEventSynchronize")
        pinned = np.ctypeslib.as_array((ctypes.c_float * host.size).from_address(self.buffers[slot]))
        pinned[...] = host.reshape(-1)
        stream.copy_from_host(dst, self.buffers[slot], host.nbytes)
        check(self.cudart, self.cudart.cudaEventRecord(self.events[slot], stream.handle), "cudaEventRecord")

    def close(self) -> None:
        """Free the page-locked buffers and destroy the events (the caller synchronizes the
        stream first); a second call does nothing."""
        buffers, self.buffers = self.buffers, []
        events, self.events = self.events, []
        cudart = self.cudart
        release = [lambda b=b: check(cudart, cudart.cudaFreeHost(b), "cudaFreeHost") for b in buffers]
        release += [lambda e=e: check(cudart, cudart.cudaEventDestroy(e), "cudaEventDestroy") for e in events]
        release_all(release)


def destroy_graph(cudart, graph) -> None:
    """Release a captured graph (cudaStreamEndCapture's)."""
    check(cudart, cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")


def destroy_graph_exec(cudart, graph_exec) -> None:
    """Release a graph executable made by :meth:`Stream.capture`."""
    check(cudart, cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
