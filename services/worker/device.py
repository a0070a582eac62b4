"""What a worker tells the scheduler about its device: memory total and free."""

from __future__ import annotations

import os
import re
import socket

import psutil

from shared.protocol import DeviceInfo

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int]:
    m = _DEVICE_RE.match(device)
    if not m:
        raise ValueError(f"{device!r} is not a device; use cpu, cpu:N or cuda:N")
    return m.group(1), int(m.group(2) or 0)


class DeviceProbe:
    """Reads the device's memory. CPU: a budget (config, else 80% of RAM) less what instances hold."""

    def __init__(self, device: str, cpu_budget_mb: int = 0):
        self.device = device
        self.kind, self.index = parse_device(device)
        self.host = socket.gethostname()
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
        return DeviceInfo(worker_id=worker_id, host=self.host, device=self.device, total_memory=int(total),
                          free_memory=int(free), gpu_name=self.gpu_name, pid=os.getpid())
