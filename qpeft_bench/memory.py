"""Memory probes (docs/design.md §6): on CUDA the allocator's peak per step; on the CPU the process' peak RSS."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _proc_status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _nvml_used(device: str) -> int | None:
    """Bytes in use on the GPU per NVML (nvidia-ml-py), or None without it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if index is None else index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


class MemoryProbe:
    """`reset()` after warm-up, `step()` after each measured step; `summary()` gives peak and mean."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss"
        self.samples: list[int] = []
        self.device_used: list[int] = []
        self.peak_reserved = 0
        self.peak_reset = True

    def reset(self) -> None:
        self.samples = []
        self.device_used = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0).
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.peak_reset = False  # the peak then includes set-up (loading, quantizing); recorded as such

    def step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.samples.append(torch.cuda.max_memory_allocated(self.device))
            # read before the reset below, which clears the reserved peak too
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            used = _nvml_used(self.device)
            if used is not None:
                self.device_used.append(used)
        else:
            rss = _proc_status_kib("VmRSS")
            if rss is not None:
                self.samples.append(rss * 1024)

    def summary(self) -> dict:
        out = {"memory_kind": self.kind, "peak_reset_after_warmup": self.peak_reset}
        if self.cuda:
            out["peak_memory_bytes"] = max(self.samples, default=0)
            out["peak_reserved_bytes"] = self.peak_reserved
            # device-wide use as NVML sees it (CUDA context, other processes, paged optimizer state included),
            # sampled after each measured step; None where NVML is not available
            out["device_used_peak_bytes"] = max(self.device_used, default=None)
        else:
            hwm = _proc_status_kib("VmHWM")
            out["peak_memory_bytes"] = hwm * 1024 if hwm is not None else max(self.samples, default=0)
        out["mean_memory_bytes"] = int(sum(self.samples) / len(self.samples)) if self.samples else None
        return out
