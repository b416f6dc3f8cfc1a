"""Choose the compute device and dtype of a worker, and report its memory.

Contract: ``pick(spec)`` turns ``auto | cpu | cuda | cuda:N`` into a :class:`DeviceInfo`
(device, dtype, human name, total and free bytes).  ``auto`` takes the first CUDA device when
torch sees one, else the CPU.  CUDA computes in bfloat16 where supported, else float16; the
CPU computes in float32.  Only reads torch and psutil; no side effects.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import psutil
import torch


class DeviceError(ValueError):
    """The requested device does not exist here."""


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype
    name: str
    total_memory: int  # bytes
    free_memory: int  # bytes


def cpu_name() -> str:
    """The processor's model name (e.g. "AMD Ryzen 7 5800X 8-Core Processor") where the OS says it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def pick(spec: str = "auto") -> DeviceInfo:
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = "cuda:0"
    if spec == "cpu":
        vm = psutil.virtual_memory()
        return DeviceInfo(torch.device("cpu"), torch.float32, cpu_name(), vm.total, vm.available)
    if spec.startswith("cuda:") and spec[5:].isdigit():
        idx = int(spec[5:])
        if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise DeviceError(f"device {spec!r} not available (torch sees {seen} CUDA devices)")
        free, total = torch.cuda.mem_get_info(idx)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceInfo(torch.device(spec), dtype, torch.cuda.get_device_name(idx), total, free)
    raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
