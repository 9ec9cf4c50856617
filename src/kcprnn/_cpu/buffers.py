"""CPU buffers reused between calls (by the fused recurrences and the KCP walk's final gather).

A recurrence over a long sequence writes tens of megabytes of activations per direction (the
speech-size LSTM: 39 MB of gates, 10 MB for each of the states). Fresh buffers that large come
from the system as new pages, and the first write to every 4 kB page is a page fault: on a
virtual machine about 0.7 ms per megabyte, as much as the compiled loop that fills them. The
buffers here are kept per thread and handed out again once nothing refers to them any more, so a
training loop that runs the same shapes call after call writes into warm memory.

- :func:`pooled_empty`: an uninitialised tensor whose memory is a pooled buffer of exactly its
  size, free for reuse once every tensor sharing its storage is gone (the outputs a caller keeps,
  the activations an autograd graph saves). At most :data:`POOL_MAX` elements per thread are
  pooled; :func:`release_buffers` returns them to the system.
- :func:`scratch`: one buffer per thread for data that dies before the next call (the backward's
  factor-major gradient rows).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["POOL_MAX", "POOL_MIN", "SCRATCH_MAX", "pooled_empty", "release_buffers", "scratch"]

SCRATCH_MAX = 1 << 24
"""Elements of the largest buffer a thread keeps between backward passes for the gradient rows
that only the factor gradients read (larger ones are allocated at every call)."""

POOL_MAX = 1 << 26
"""Elements (of every dtype together) that the buffers pooled by one thread may hold: 256 MB of
float32. A request that would exceed it, after the unused buffers are dropped, is allocated
outside the pool."""

POOL_MIN = 1 << 16
"""Elements of the smallest pooled buffer: smaller ones come from the allocator at every call,
where they are cheap."""

_LOCAL = threading.local()


def _pool() -> list[Tensor]:
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = []
    return pool


def _unused(buf: Tensor) -> bool:
    """Whether no tensor other than the pool's own shares ``buf``'s storage (the temporary
    storage object made here holds the second reference)."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2


def pooled_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``: on the CPU, for at least
    :data:`POOL_MIN` elements, a pooled buffer of exactly that many elements that no tensor
    refers to any more (a new one, kept in the pool while it fits in :data:`POOL_MAX`, where
    none is free). Its storage is the buffer itself, of the tensor's size."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if device.type != "cpu" or numel < POOL_MIN or numel > POOL_MAX:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = _pool()
    for buf in pool:
        if buf.dtype == dtype and buf.numel() == numel and _unused(buf):
            return buf.view(shape)
    held = sum(b.numel() for b in pool)
    if held + numel > POOL_MAX:  # drop unused buffers of other shapes, largest first
        for buf in sorted(pool, key=lambda b: -b.numel()):
            if held + numel <= POOL_MAX:
                break
            if _unused(buf):
                # by identity: list.remove would compare tensors elementwise
                del pool[next(i for i, b in enumerate(pool) if b is buf)]
                held -= buf.numel()
    with torch.inference_mode(False):  # a normal tensor even when called in inference mode
        buf = torch.empty(numel, dtype=dtype, device=device)
    if held + numel <= POOL_MAX:
        pool.append(buf)
    return buf.view(shape)


def release_buffers() -> None:
    """Returns this thread's pooled buffers and scratch buffer to the system (the tensors still
    in use keep their memory until they are gone)."""
    _LOCAL.pool = []
    _LOCAL.buf = None


def scratch(like: Tensor) -> Tensor:
    """An uninitialised tensor of ``like``'s shape, dtype and device that the caller drops
    before the next call on this thread: a buffer kept between calls up to :data:`SCRATCH_MAX`
    elements."""
    numel = like.numel()
    if numel > SCRATCH_MAX or like.device.type != "cpu":
        return torch.empty_like(like)
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = _LOCAL.buf = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(like.shape)
