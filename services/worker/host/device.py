"""What a worker tells the scheduler about its device: memory total and free."""

from __future__ import annotations

import os
import re
import socket

import psutil

from zinfer.shared.instances import DeviceInfo

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def local_address(endpoint: str) -> str:
    """The address this host reaches the broker from: the source address the kernel picks for a datagram to the
    broker (nothing is sent). "" for ipc:// endpoints."""
    if not endpoint.startswith("tcp://"):
        return ""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    if host in ("*", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port or 9)))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return ""


def is_local(endpoint: str) -> bool:
    """Whether the broker is on this host by its endpoint: ipc, a loopback address, or one of this host's own
    addresses (the kernel routes a datagram to it from that same address)."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1", "*", "0.0.0.0") or host.startswith("127.") or local_address(endpoint) == host


def default_worker_id(device: str, endpoint: str) -> str:
    """A worker's name in the mesh: its device ("cuda:0") beside a local broker; "HOST/cuda:0" when the broker
    is elsewhere, so that the first GPU of every host has a name of its own."""
    return device if is_local(endpoint) else f"{socket.gethostname()}/{device}"


def parse_device(device: str) -> tuple[str, int]:
    m = _DEVICE_RE.match(device)
    if not m:
        raise ValueError(f"{device!r} is not a device; use cpu, cpu:N or cuda:N")
    return m.group(1), int(m.group(2) or 0)


class DeviceProbe:
    """Reads the device's memory. CPU: a budget (config, else 80% of RAM) less what instances hold."""

    def __init__(self, device: str, cpu_budget_mb: int = 0, endpoint: str = ""):
        self.device = device
        self.kind, self.index = parse_device(device)
        self.host = socket.gethostname()
        self.address = local_address(endpoint)
        self.gpu_name = ""
        if self.kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"{device}: CUDA is not available in this process")
            self.gpu_name = torch.cuda.get_device_name(0)  # CUDA_VISIBLE_DEVICES leaves one GPU: index 0
        self.budget = (cpu_budget_mb * 2**20) if cpu_budget_mb else int(psutil.virtual_memory().total * 0.8)

    @property
    def torch_device(self) -> str:
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def info(self, worker_id: str, used_by_instances: int) -> DeviceInfo:
        if self.kind == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(0)
        else:
            total = self.budget
            free = max(0, self.budget - used_by_instances)
        return DeviceInfo(worker_id=worker_id, host=self.host, address=self.address, device=self.device,
                          total_memory=int(total),
                          free_memory=int(free), gpu_name=self.gpu_name, pid=os.getpid())
