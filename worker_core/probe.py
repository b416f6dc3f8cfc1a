"""What this machine can offer the group: GPUs, memory, CPU, a measured speed, the link.

Contract: ``probe(device="auto", master=None)`` returns a :class:`Probe`.  GPUs come from
:func:`worker_core.gpus.list_gpus` (NVML, no torch; re-exported here as ``nvidia_gpus`` and
``Gpu``): name, total/free memory, compute capability and driver; no driver or no library means
no GPU, never an error.  RAM and CPU come from
``psutil``.  ``matmul_gflops`` is measured here: a short burst of ``[128 x 2048] @
[2048 x 2048]`` matrix products on the chosen device in its compute dtype (a decode-like
shape).  With ``master`` (``host:port`` of a plain loopback master), ``rtt_ms`` is the best
of five HTTP round trips to its ``/health``.  With ``group`` (the data folder of a joined
machine), the link is measured over the group's mutual-TLS port: ``rtt_ms`` the best of five
empty ``/v1/probe`` round trips on one connection, ``bandwidth_mbps`` the download speed of
``PROBE_BYTES`` from the master.  ``offered`` is the memory a worker here would offer the
group (the device's free memory), from which ``molink probe`` tells how many layers of
common models this machine would hold at each precision.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from . import device as devices
from .gpus import GpuInfo as Gpu
from .gpus import list_gpus as nvidia_gpus

log = logging.getLogger("molink.probe")


@dataclass(frozen=True)
class Probe:
    gpus: list[Gpu] = field(default_factory=list)
    ram_total: int = 0  # bytes
    ram_available: int = 0  # bytes
    cpu: str = ""
    cpu_cores: int = 0
    device: str = "cpu"  # what a worker here would compute on
    dtype: str = "float32"
    offered: int = 0  # bytes a worker here would offer the group (its device's free memory)
    matmul_gflops: float = 0.0
    rtt_ms: float | None = None
    bandwidth_mbps: float | None = None  # master -> this machine, Mbit/s (groups only)

    def as_dict(self) -> dict:
        return asdict(self)


def device_facts(info: devices.DeviceInfo) -> dict:
    """What a worker announces besides its memory and speed: compute capability and driver of
    its CUDA device (empty on a CPU or without NVML), system RAM and CPU cores, which device it
    computes on (:func:`compute_device_id`) and with how many CPU threads."""
    gpu = None
    if info.device.type == "cuda":
        gpu = next((g for g in nvidia_gpus() if g.index == (info.device.index or 0)), None)
    return {
        "compute_capability": gpu.compute_capability if gpu else "",
        "driver": gpu.driver if gpu else "",
        "ram_total": psutil.virtual_memory().total,
        "cpu_cores": os.cpu_count() or 1,
        "machine": compute_device_id(info),
        "threads": torch.get_num_threads() if info.device.type == "cpu" else 0,
    }


def compute_device_id(info: devices.DeviceInfo) -> str:
    """An opaque id of the device a worker computes on: equal for two workers on the same device
    of the same machine (they share its compute), different otherwise.  Made of the machine's
    network hardware address and host name and the device, hashed (nothing readable leaves)."""
    raw = f"{uuid.getnode():x}|{socket.gethostname()}|{info.device}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def matmul_gflops(info: devices.DeviceInfo, seconds: float = 0.3) -> float:
    a = torch.randn(128, 2048, device=info.device, dtype=info.dtype)
    b = torch.randn(2048, 2048, device=info.device, dtype=info.dtype)
    (a @ b).sum().item()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = a @ b
        n += 1
    c.sum().item()  # waits for the device
    return n * 2 * 128 * 2048 * 2048 / (time.perf_counter() - t0) / 1e9


PROBE_BYTES = 8 * 1024 * 1024  # `molink probe` downloads this much to time the link
WORKER_PROBE_BYTES = 2 * 1024 * 1024  # a worker, before each tunnel, downloads this much


async def measure_link(
    base_url: str, tls: ssl.SSLContext | None = None, nbytes: int = PROBE_BYTES
) -> tuple[float | None, float | None]:
    """(round trip ms, download Mbit/s) to a master; None where it could not be measured.

    ``base_url`` is ``https://host:port`` of a group port (``tls`` this member's client
    context): the round trip is the best of five empty ``/v1/probe`` requests on one
    connection (after one that pays the handshake), the bandwidth a download of ``nbytes``.
    A plain ``http://`` master (loopback tests) has only ``/health``: round trip only."""
    import aiohttp

    from .pairing import TUNNEL_SNI

    kw: dict = {"ssl": tls, "server_hostname": TUNNEL_SNI} if tls is not None else {}
    group = tls is not None
    url = f"{base_url}/v1/probe" if group else f"{base_url}/health"
    rtt = mbps = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            rtts = []
            for _ in range(6):  # the first pays the connection (and TLS handshake)
                t0 = time.perf_counter()
                async with http.get(url, params={"bytes": "0"} if group else None, **kw) as r:
                    if group:  # a plain master answers 503 while its group forms: still a round trip
                        r.raise_for_status()
                    await r.read()
                rtts.append(time.perf_counter() - t0)
            rtt = min(rtts[1:]) * 1000
            if group and nbytes > 0:
                t0 = time.perf_counter()
                async with http.get(url, params={"bytes": str(nbytes)}, **kw) as r:
                    r.raise_for_status()
                    n = len(await r.read())
                mbps = n * 8 / (time.perf_counter() - t0) / 1e6
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        log.debug("link to %s not measured: %s", base_url, e)
    return rtt, mbps


def group_link(data_dir: Path) -> tuple[float | None, float | None]:
    """(round trip ms, download Mbit/s) to the joined group's master; None if unreachable."""
    from .identity import client_context, load_or_create
    from .pairing import JoinedGroup

    joined = JoinedGroup.load(data_dir)
    ctx = client_context(load_or_create(data_dir / "identity", joined.name), joined.master_cert)
    return asyncio.run(measure_link(f"https://{joined.master_address}", ctx))


def probe(device: str = "auto", master: str | None = None, group: Path | None = None) -> Probe:
    info = devices.pick(device)
    if group is not None:
        rtt, mbps = group_link(group)
    else:
        rtt, mbps = asyncio.run(measure_link(f"http://{master}")) if master else (None, None)
    vm = psutil.virtual_memory()
    from .wire import DTYPE_NAMES

    return Probe(
        gpus=nvidia_gpus(),
        ram_total=vm.total,
        ram_available=vm.available,
        cpu=devices.cpu_name(),
        cpu_cores=os.cpu_count() or 1,
        device=str(info.device),
        dtype=DTYPE_NAMES[info.dtype],
        offered=info.free_memory,
        matmul_gflops=matmul_gflops(info),
        rtt_ms=rtt,
        bandwidth_mbps=mbps,
    )
