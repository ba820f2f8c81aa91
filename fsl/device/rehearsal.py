"""A CUDA rehearsal on a CPU: fsl's CUDA-only code runs here, through torch's own public API, with only the driver
faked (issue #47).

fsl's GPU path cannot run where its tests run (no GPU in CI, none on the developers' machines), and a test that stubs a
torch function hides the argument checks that torch would make (a stub of `torch.cuda.set_device` hid a crash on the
first batch of every single-GPU run). So `rehearsal()` replaces what a missing driver cannot answer and nothing
above it:

- the `torch._C` entry points that call the CUDA runtime: device count and selection (per thread, as CUDA's current
  device is), initialisation (which defines `torch.cuda.default_generators` and `_get_device_properties`, as the C++
  does), device properties, streams and events (their C++ base classes; torch.cuda.streams is re-executed on the fake
  bases, so `torch.cuda.Stream` and `Event` are torch's own Python classes), synchronize, the caching allocator's
  statistics and empty_cache, and cudaMemGetInfo;
- the device's memory: a tensor asked for on `cuda` is made on the CPU (a torch function mode rewrites the `device`
  argument, `.to(...)`, `.cuda()`), pinning is a flag on the CPU tensor, and `record_stream` checks that it is given
  a CUDA stream. The faked allocator's statistics are the live tensors' bytes (fsl.device.memory_count.LiveTensors).

Everything else is torch as shipped: `torch.cuda.set_device` still refuses a `torch.device("cuda")` without an index,
`get_device_capability` reads the properties, `torch.cuda.stream()` sets and restores the current stream through
the faked entry points, and so on. The rehearsal's arithmetic is the CPU's (bf16 autocast on `cuda` leaves CPU
tensors in float32): it checks that the CUDA path runs and what it calls, not its numbers or its speed.

    with rehearsal(devices=1):
        fsl.train.meta_train.run(load_config(path, ["device=cuda", ...]))

benchmarks/cuda_rehearsal.py runs fsl's commands (train, test, adapt) in it, as a user types them.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from fsl.device.memory_count import LiveTensors

GiB = 2**30


@dataclass(frozen=True)
class FakeGPU:
    """What the faked driver reports for each of its devices."""
    name: str = "Rehearsal GPU (CPU, faked driver)"
    major: int = 9
    minor: int = 0
    total_memory: int = 80 * GiB
    multi_processor_count: int = 132


class Driver:
    """The state a CUDA driver and runtime keep for a process: per-thread current device and streams, streams and
    events made, memory counted by `memory`. `calls` records (entry point, the calling thread's name) as they are
    called: a test can assert what the code asked the driver for, and from which thread."""

    def __init__(self, devices: int, gpus: tuple[FakeGPU, ...], memory: LiveTensors):
        self.devices, self.gpus, self.memory = devices, gpus, memory
        self.local = threading.local()
        self.calls: list[tuple[str, str]] = []
        self.used_elsewhere = 0  # bytes other processes hold on each device (what cudaMemGetInfo does not report free)
        self.next_stream = 1
        self.lock = threading.Lock()

    def call(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    def check_index(self, index: int, what: str) -> int:
        if not 0 <= index < self.devices:
            # the runtime's cudaErrorInvalidDevice, as torch reports it
            raise RuntimeError(f"CUDA error: invalid device ordinal ({what}({index}) with {self.devices} device(s))")
        return index

    def current(self) -> int:
        return getattr(self.local, "device", 0)  # a new thread's current device is 0, as CUDA's is

    def current_streams(self) -> dict[int, int]:
        if not hasattr(self.local, "streams"):
            self.local.streams = {}
        return self.local.streams


class _StreamBase(torch.Stream):
    """torch._C._CudaStreamBase as the faked driver makes it: a torch.Stream (an id on a CUDA device; 0: the default
    stream), which torch's argument parser accepts wherever a stream is expected."""

    driver: Driver  # set by `rehearsal`

    def __new__(cls, priority: int = 0, stream_id: int | None = None, device_index: int | None = None,
                device_type: int | None = None, stream_ptr: int | None = None):
        driver = cls.driver
        if stream_id is None:  # a new stream from the pool, on the current device
            driver.call("cudaStreamCreate")
            with driver.lock:
                stream_id, driver.next_stream = driver.next_stream, driver.next_stream + 1
            device_index = driver.current()
        self = torch.Stream.__new__(cls, stream_id=stream_id, device_index=driver.check_index(device_index, "stream"),
                                    device_type=1 if device_type is None else device_type)  # 1: c10 CUDA
        self.cuda_stream = stream_ptr or stream_id
        return self

    def query(self) -> bool:
        return True  # the CPU has done the work already

    def synchronize(self) -> None:
        self.driver.call("cudaStreamSynchronize")

    def is_capturing(self) -> bool:
        return False  # no CUDA graph is ever captured


class _EventBase:
    """torch._C._CudaEventBase as the faked driver makes it: records on a stream of one device, waited on by any."""

    driver: Driver

    def __new__(cls, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                external: bool = False):
        self = object.__new__(cls)
        self.enable_timing, self.recorded_on = enable_timing, None
        return self

    def record(self, stream) -> None:
        if not isinstance(stream, _StreamBase):
            raise TypeError(f"Event.record: expected a CUDA stream, got {type(stream).__name__}")
        if self.recorded_on is not None and self.recorded_on.device_index != stream.device_index:
            raise RuntimeError(f"Event device {self.recorded_on.device_index} does not match recording stream's "
                               f"device {stream.device_index}.")
        self.driver.call("cudaEventRecord")
        self.recorded_on = stream

    def wait(self, stream) -> None:
        if not isinstance(stream, _StreamBase):
            raise TypeError(f"Event.wait: expected a CUDA stream, got {type(stream).__name__}")
        self.driver.call("cudaStreamWaitEvent")

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.driver.call("cudaEventSynchronize")

    def elapsed_time(self, end) -> float:
        return 0.0


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


def _check_cuda_device(driver: Driver, device: Any) -> None:
    """The checks torch would make of a CUDA device argument: a known index."""
    device = torch.device(device)
    if device.index is not None:
        driver.check_index(device.index, "device")


class HostAsDevice(TorchFunctionMode):
    """Tensors asked for on `cuda` are made on the CPU; pinning is a flag on the tensor; record_stream checks its
    stream. Everything else passes through unchanged."""

    def __init__(self, driver: Driver):
        super().__init__()
        self.driver = driver

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if _is_cuda(kwargs.get("device")):
            _check_cuda_device(self.driver, kwargs["device"])
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
            out = func(*args, **kwargs)
            out._rehearsal_pinned = True  # page-locked, as far as the rehearsal knows
            return out
        if name == "pin_memory" and args and isinstance(args[0], torch.Tensor):
            self.driver.call("cudaHostAlloc")
            out = args[0].clone()
            out._rehearsal_pinned = True  # page-locked, as far as the rehearsal knows
            return out
        if name == "is_pinned" and args and isinstance(args[0], torch.Tensor):
            return getattr(args[0], "_rehearsal_pinned", False)
        if name == "record_stream":  # torch has parsed the arguments: a torch.Stream
            stream = args[1] if len(args) > 1 else kwargs.get("s")
            if stream.device_type != 1:
                raise RuntimeError(f"record_stream of a CUDA tensor on a {stream.device} stream")
            self.driver.call("recordStream")
            return None
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            device = args[1] if len(args) > 1 else kwargs.get("device")
            if device is not None:
                _check_cuda_device(self.driver, device if not isinstance(device, int) else f"cuda:{device}")
            return args[0]
        if name == "to" and args and isinstance(args[0], torch.Tensor):
            args = tuple(self._host(a) for a in args)
        return func(*args, **kwargs)

    def _host(self, value: Any) -> Any:
        if _is_cuda(value):
            _check_cuda_device(self.driver, value)
            return "cpu"
        return value


def _no_trace(frame, event, arg) -> None:
    """A global trace function that traces no frame (keeps tracing on, for `rehearsal`'s thread hook)."""
    return None


def _memory_stats(driver: Driver) -> Callable[[int], dict]:
    def stats(device: int) -> dict:
        driver.check_index(device, "memoryStats")
        allocated = driver.memory.current()
        current_peak = {"current": allocated, "peak": driver.memory.peak}
        return {"allocated_bytes": {"all": current_peak}, "reserved_bytes": {"all": dict(current_peak)},
                "active_bytes": {"all": dict(current_peak)}, "num_alloc_retries": 0, "num_ooms": 0}
    return stats


def _entry_points(driver: Driver) -> dict[str, Any]:
    """torch._C's CUDA entry points, as a driver with `driver.devices` GPUs answers them."""
    def init() -> None:
        driver.call("cuInit")
        # what THCPModule_initExtension does: one generator per device, and the properties reader
        torch.cuda.default_generators = tuple(torch.Generator() for _ in range(driver.devices))
        torch.cuda._get_device_properties = properties

    def properties(index: int) -> SimpleNamespace:
        gpu = driver.gpus[driver.check_index(index, "getDeviceProperties")]
        return SimpleNamespace(name=gpu.name, major=gpu.major, minor=gpu.minor, total_memory=gpu.total_memory,
                               multi_processor_count=gpu.multi_processor_count, is_integrated=False,
                               is_multi_gpu_board=False, gcnArchName="", uuid=f"GPU-rehearsal-{index}",
                               L2_cache_size=50 * 2**20)

    def set_device(index: int) -> None:
        driver.call(f"cudaSetDevice({index})")
        driver.local.device = driver.check_index(index, "cudaSetDevice")

    def exchange(index: int) -> int:
        previous = driver.current()
        if index >= 0:
            set_device(index)
        return previous

    def current_stream(index: int) -> tuple[int, int, int]:
        index = driver.current() if index is None or index < 0 else driver.check_index(index, "getCurrentStream")
        return driver.current_streams().get(index, 0), index, 1

    def set_stream(stream_id: int, device_index: int, device_type: int) -> None:
        driver.current_streams()[driver.check_index(device_index, "setStream")] = stream_id

    def reset_peak(device: int) -> None:
        driver.check_index(device, "resetPeakMemoryStats")
        driver.memory.reset_peak()

    return {
        "_cuda_getDeviceCount": lambda: driver.devices,
        "_cuda_init": init,
        "_cuda_setDevice": set_device,
        "_cuda_getDevice": driver.current,
        "_cuda_exchangeDevice": exchange,
        "_cuda_maybeExchangeDevice": exchange,
        "_cuda_getCurrentStream": current_stream,
        "_cuda_getDefaultStream": lambda index: (0, driver.current() if index < 0 else index, 1),
        "_cuda_setStream": set_stream,
        "_cuda_synchronize": lambda: driver.call("cudaDeviceSynchronize"),
        "_cuda_emptyCache": lambda: driver.call("emptyCache"),
        "_cuda_memoryStats": _memory_stats(driver),
        "_cuda_resetPeakMemoryStats": reset_peak,
        "_CudaStreamBase": _StreamBase,
        "_CudaEventBase": _EventBase,
        **_accelerator_entry_points(driver, set_device, exchange, current_stream, set_stream),
    }


def _accelerator_entry_points(driver: Driver, set_device: Callable, exchange: Callable, current_stream: Callable,
                              set_stream: Callable) -> dict[str, Any]:
    """torch.accelerator's entry points, the device-generic API, on the same faked driver (torch.optim's
    graph-capture check reads the current stream through it)."""
    return {
        "_accelerator_getDeviceIndex": driver.current,
        "_accelerator_setDeviceIndex": set_device,
        "_accelerator_exchangeDevice": exchange,
        "_accelerator_maybeExchangeDevice": exchange,
        "_accelerator_getStream": lambda index: torch.cuda.Stream(**dict(zip(
            ("stream_id", "device_index", "device_type"), current_stream(index)))),
        "_accelerator_setStream": lambda stream: set_stream(stream.stream_id, stream.device_index, 1),
        "_accelerator_synchronizeDevice": lambda index: driver.call("cudaDeviceSynchronize"),
    }


class _Cudart:
    """torch._C._cudart, the runtime functions torch.cuda calls directly."""

    def __init__(self, driver: Driver):
        self.driver = driver

    def cudaMemGetInfo(self, device: int) -> tuple[int, int]:
        self.driver.call("cudaMemGetInfo")
        self.driver.check_index(device, "cudaMemGetInfo")
        total = self.driver.gpus[device].total_memory
        return total - self.driver.used_elsewhere - self.driver.memory.current(), total


def _thread_start(modes: tuple, trace: Callable | None) -> Callable:
    """A threading.settrace hook for a new thread's first event (its run() frame): the modes are thread-local, so
    it enters them there, and leaves them when run() returns (a thread's mode stack must be empty when it ends)."""
    def hook(frame, event, arg):
        for mode in modes:
            mode.__enter__()
        inner = trace(frame, event, arg) if trace is not None else None
        sys.settrace(trace or _no_trace)  # run()'s return event needs tracing on in this thread

        def at_return(frame, event, arg):
            nonlocal inner
            if inner is not None:
                inner = inner(frame, event, arg)
            if event == "return":
                for mode in reversed(modes):
                    mode.__exit__(None, None, None)
            return at_return
        return at_return
    return hook


CUDA_ATTRIBUTES = ("_cudart", "_exchange_device", "_maybe_exchange_device", "Stream", "Event", "ExternalStream",
                   "default_generators", "_initialized", "_cached_device_count", "_get_device_properties")


def _install(driver: Driver, entry_points: dict[str, Any]) -> dict[str, Any]:
    """Put the faked driver under torch: torch._C's entry points, torch.cuda.streams re-executed on the faked bases,
    torch.cuda's own aliases of torch._C (bound when it was imported). Returns what `_restore` puts back."""
    streams = sys.modules["torch.cuda.streams"]
    saved = {"_C": {name: getattr(torch._C, name) for name in entry_points}, "streams": dict(vars(streams)),
             "cuda": {name: getattr(torch.cuda, name, None) for name in CUDA_ATTRIBUTES}}
    for name, value in entry_points.items():
        setattr(torch._C, name, value)
    importlib.reload(streams)  # torch's Stream and Event classes, on the faked bases
    torch.cuda.Stream, torch.cuda.Event, torch.cuda.ExternalStream = streams.Stream, streams.Event, streams.ExternalStream
    torch.cuda._cudart = _Cudart(driver)
    torch.cuda._exchange_device = torch.cuda._maybe_exchange_device = entry_points["_cuda_exchangeDevice"]
    torch.cuda._initialized, torch.cuda._cached_device_count = False, None
    return saved


def _restore(saved: dict[str, Any]) -> None:
    for name, value in saved["_C"].items():
        setattr(torch._C, name, value)
    streams = vars(sys.modules["torch.cuda.streams"])
    streams.clear()
    streams.update(saved["streams"])
    for name, value in saved["cuda"].items():
        if value is None and name == "_get_device_properties":
            if hasattr(torch.cuda, name):
                delattr(torch.cuda, name)
        else:
            setattr(torch.cuda, name, value)


@contextlib.contextmanager
def rehearsal(devices: int = 1, gpu: FakeGPU | tuple[FakeGPU, ...] = FakeGPU(),
              trace: Callable | None = None) -> Iterator[Driver]:
    """Within the block torch sees `devices` CUDA GPUs whose driver is faked (module docstring), each a `gpu` (or
    gpu[i], one per device); every thread started inside it (fsl's producer thread) runs with the same faked device
    memory. `trace`: a sys.settrace function for the threads started inside (line coverage). Restores torch as it
    was. The faked memory is one pool for all devices (fsl uses one GPU per process), limited to the first GPU's."""
    gpus = gpu if isinstance(gpu, tuple) else (gpu,) * devices
    assert len(gpus) == devices, (len(gpus), devices)
    memory = LiveTensors(limit=gpus[0].total_memory)
    driver = Driver(devices, gpus, memory)
    _StreamBase.driver = _EventBase.driver = driver
    modes = (memory, HostAsDevice(driver))
    previous_thread_trace, monitor_interval = threading.gettrace(), tqdm.monitor_interval
    saved = _install(driver, _entry_points(driver))
    try:
        threading.settrace(_thread_start(modes, trace))
        tqdm.monitor_interval = 0  # no progress-bar monitor thread: it would outlive the block with the modes entered
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            yield driver
    finally:
        tqdm.monitor_interval = monitor_interval
        threading.settrace(previous_thread_trace)
        _restore(saved)
