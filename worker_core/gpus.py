"""This machine's NVIDIA GPUs as NVML reports them, without torch.

Contract: ``list_gpus()`` returns one :class:`GpuInfo` per GPU NVML can see (package
``nvidia-ml-py``, module ``pynvml``): index, name, total and free memory in bytes, CUDA compute
capability ("8.6") and driver version.  No library, no driver or no GPU gives ``[]``, never an
error; a GPU that NVML cannot read (fallen off the bus, a driver error) is left out and logged.
Importing this module is cheap (no torch, pynvml only on call), so the tray app can show
"GPU name, memory" from it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger("molink.gpus")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_memory: int  # bytes
    free_memory: int  # bytes
    compute_capability: str  # "major.minor"
    driver: str  # NVIDIA driver version, e.g. "555.42.02"


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def list_gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: a CPU machine
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        count = pynvml.nvmlDeviceGetCount()
    except Exception as e:
        log.warning("NVML answered nvmlInit but not the device list: %s", e)
        _shutdown(pynvml)
        return []
    out = []
    try:
        for i in range(count):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                name = _text(pynvml.nvmlDeviceGetName(h))
            except Exception as e:
                log.warning("GPU %d not readable through NVML: %s", i, e)
                continue
            out.append(GpuInfo(i, name, int(mem.total), int(mem.free), f"{major}.{minor}", driver))
    finally:
        _shutdown(pynvml)
    return out


def _shutdown(pynvml) -> None:  # noqa: ANN001  (the module)
    with contextlib.suppress(Exception):  # NVML half-initialised or gone: nothing to release
        pynvml.nvmlShutdown()
