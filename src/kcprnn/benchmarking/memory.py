"""Peak memory of one case: extra bytes a forward (and a forward+backward) needs above what the
built module and its input already hold.

- CUDA: in process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: one subprocess per case (``python -m kcprnn.benchmarking.memory``), so cases do not see
  each other's freed-but-cached memory. The worker builds the case, runs it once to warm up,
  resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``, Linux >= 4.0),
  runs it again and reports ``VmHWM - VmRSS``. glibc is told to unmap freed blocks of 64 KiB and
  more at once, so memory freed by the warm-up is not reused unseen. Where the reset is not
  allowed it falls back to ``ru_maxrss`` around the first call. Resident memory has page
  granularity and includes allocator slack, so small cases read as a few pages.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from .cases import BuiltCase, CaseSpec, build_case

__all__ = ["cuda_peak_bytes", "measure_cpu_in_worker", "measure_peak_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA bytes allocated by ``fn`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _drop_grads(built: BuiltCase) -> None:
    if built.module is not None:
        for p in built.module.parameters():
            p.grad = None


def _cpu_peak(fn: Callable[[], object], can_reset: bool, built: BuiltCase) -> int:
    if can_reset:
        fn()  # warm-up: lazy library state is not charged to the case
        _drop_grads(built)  # the measured step allocates its gradients, as a training step does
        _reset_hwm()
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) * 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024


def measure_cpu_in_worker(spec: CaseSpec, threads: int) -> dict[str, Any]:
    """The CPU measurement; runs inside the worker process."""
    torch.set_num_threads(threads)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the BLAS/OpenMP pools before the baseline
    built: BuiltCase = build_case(spec, torch.device("cpu"))
    can_reset = os.path.exists("/proc/self/clear_refs") and _reset_hwm()
    out: dict[str, Any] = {"method": "VmHWM-reset" if can_reset else "ru_maxrss-first-call"}
    out["forward_bytes"] = _cpu_peak(built.forward, can_reset, built)
    if built.forward_backward is not None:
        out["forward_backward_bytes"] = _cpu_peak(built.forward_backward, can_reset, built)
    return out


def measure_peak_memory(
    spec: CaseSpec, device: torch.device, threads: int, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Peak extra memory of ``spec`` (forward and forward+backward), or ``{"error": ...}``."""
    if device.type == "cuda":
        built = build_case(spec, device)
        built.forward()
        out: dict[str, Any] = {
            "method": "cuda.max_memory_allocated",
            "forward_bytes": cuda_peak_bytes(built.forward, device),
        }
        if built.forward_backward is not None:
            built.forward_backward()
            _drop_grads(built)
            out["forward_backward_bytes"] = cuda_peak_bytes(built.forward_backward, device)
        return out
    cmd = [sys.executable, "-m", "kcprnn.benchmarking.memory", str(threads)]
    try:
        proc = subprocess.run(
            cmd,
            input=json.dumps(spec.as_dict()),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory worker timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"memory worker exited {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _unbuffered_malloc() -> None:
    """Make glibc return freed blocks of 64 KiB and more to the kernel at once (fixed mmap
    threshold, no heap-top padding), so the warm-up call's freed intermediates are not silently
    reused by the measured call and every live tensor shows in the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)


def _worker_main() -> int:
    _unbuffered_malloc()
    threads = int(sys.argv[1])
    spec = CaseSpec.from_dict(json.loads(sys.stdin.read()))
    print(json.dumps(measure_cpu_in_worker(spec, threads)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
