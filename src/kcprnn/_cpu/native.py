"""Compiled kernels for the steps of KCP's products that torch runs slowly on CPU.

The first contraction of a factorized layer is its one pass over the input: at the UCF11 size
(96 rows x 57,600) KCP's blocked layout multiplies a ``(15,360, 360)`` view of the input by a
``(2, 360)`` matrix, a product BLAS runs far below the speed of reading the input;
:func:`tall_matmul` runs it close to that speed, and :func:`tall_weight_grad` computes its
weight gradient. :func:`inner_rows` runs the last
factor's two-chunk CP product per row and writes it, with the bias, into the final output
layout; :func:`gather` copies a permuted view of the rows in one pass (the interleaved axes the
paper's layout gathers). The same library holds the whole recurrences with a Kronecker-sum
hidden-to-hidden matrix and the single cell steps of streaming inference
(:file:`native_rnn.cpp`), called through :mod:`kcprnn._cpu.native_rnn` and
:mod:`kcprnn._cpu.native_step`, and KCP's factor matrices from their CP factors with their
gradient (:file:`native_factor.cpp`, :mod:`kcprnn._cpu.native_factor`, float32 and float64;
the others are float32 only). All are for x86-64 CPUs with AVX-512 or AVX2 and FMA, built into
one library.

The library is C++ built when a kernel first runs (never when a format only plans or counts:
planning asks the cost model, :attr:`~kcprnn._cpu.cost.CostModel.kernels`), or ahead of time by
``kcprnn build``, with the system's C++ compiler (``g++ -O3 -march=native
-fopenmp``; about 1 s, no Python or torch headers), cached under ``$KCPRNN_CACHE_DIR`` or
``~/.cache/kcprnn`` by a hash of its source, flags, compiler and CPU, written atomically, and
loaded with :mod:`ctypes` (which releases the GIL during the call). Its OpenMP calls run on the
libgomp torch already loaded, so it shares torch's threads and honours
``torch.set_num_threads``. Where it cannot be built (no compiler, another architecture, a
read-only cache, a compiler that runs past ``$KCPRNN_BUILD_TIMEOUT`` seconds, default 120) or
``KCPRNN_NATIVE=0`` is set, :func:`available` is ``False``, one message is logged on the
``"kcprnn"`` logger, and the callers run the same plan on torch ops: the results are the same up
to float32 rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available",
    "build",
    "cache_dir",
    "counting_macs",
    "gather",
    "info",
    "inner_rows",
    "main",
    "tall_matmul",
    "tall_weight_grad",
    "width",
]

log = logging.getLogger("kcprnn")

SOURCE = Path(__file__).with_name("native_tall.cpp")
SOURCES = (  # compiled into one library
    SOURCE,
    Path(__file__).with_name("native_rnn.cpp"),
    Path(__file__).with_name("native_factor.cpp"),
    Path(__file__).with_name("native_chain.cpp"),
)
HEADERS = (  # included by native_rnn.cpp
    Path(__file__).with_name("native_simd.h"),
    Path(__file__).with_name("native_kron.h"),
    Path(__file__).with_name("native_cells.h"),
)
BUILD_TIMEOUT = 120.0  # seconds the compiler may run (``$KCPRNN_BUILD_TIMEOUT`` overrides)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_INT = ctypes.c_int

_lock = threading.Lock()
_counting = threading.local()  # "box": the running count of counting_macs, where active
_active = 0  # counting_macs blocks open in any thread
_state: dict[str, object] = {}  # "lib" (ctypes.CDLL or None), "error" (str), "path"


@contextlib.contextmanager
def counting_macs():
    """Counts the multiply-accumulates of the kernels this thread runs inside the block (torch's
    flop counter does not see them: they are called through ctypes). Yields a one-element list
    holding the running total."""
    global _active
    previous = getattr(_counting, "box", None)
    box = [0]
    _counting.box = box
    with _lock:
        _active += 1
    try:
        yield box
    finally:
        _counting.box = previous
        with _lock:
            _active -= 1


def _count(macs: int) -> None:
    if not _active:  # the common case, checked without the thread-local lookup
        return
    box = getattr(_counting, "box", None)
    if box is not None:
        box[0] += int(macs)


def cache_dir() -> Path:
    """Where built kernels are kept: ``$KCPRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kcprnn``,
    else ``~/.cache/kcprnn``."""
    if os.environ.get("KCPRNN_CACHE_DIR"):
        return Path(os.environ["KCPRNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kcprnn"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's model and flags (``-march=native`` builds for exactly this CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def sources_digest() -> str:
    """A hash of the kernels' source files (:data:`SOURCES` and :data:`HEADERS`): what the
    prices measured on them (a calibrated cost model) depend on besides the CPU."""
    sources = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
    return hashlib.sha256(b"\0".join(sources)).hexdigest()[:16]


def build_timeout() -> float:
    """Seconds the compiler may run: ``$KCPRNN_BUILD_TIMEOUT``, else :data:`BUILD_TIMEOUT`."""
    value = os.environ.get("KCPRNN_BUILD_TIMEOUT")
    if not value:
        return BUILD_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise RuntimeError(
            f"KCPRNN_BUILD_TIMEOUT must be a number of seconds, got {value!r}"
        ) from None
    if not seconds > 0:
        raise RuntimeError(f"KCPRNN_BUILD_TIMEOUT must be positive, got {value!r}")
    return seconds


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``command`` with its output captured; ``RuntimeError`` when it runs past ``timeout``."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{command[0]} ran past the {timeout:g} s build timeout (KCPRNN_BUILD_TIMEOUT)"
        ) from None


def build(flags: tuple[str, ...] = FLAGS, directory: Path | None = None) -> Path:
    """Compile :data:`SOURCES` into one library with ``flags`` into ``directory`` (default
    :func:`cache_dir`) unless a build with the same sources (and :data:`HEADERS`), flags,
    compiler and CPU is there; return the shared library's path. Raises ``RuntimeError`` with
    the compiler's message when the build fails or runs past :func:`build_timeout`."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernel is for x86-64 CPUs, this one is {platform.machine()!r}")
    timeout = build_timeout()
    version = _run([cxx, "--version"], timeout).stdout
    parts = [sources_digest(), " ".join(flags), version, _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    directory = cache_dir() if directory is None else Path(directory)
    target = directory / f"tall-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".tall-", dir=directory)
    os.close(fd)
    try:
        start = time.perf_counter()
        done = _run([cxx, *flags, *(str(path) for path in SOURCES), "-o", tmp], timeout)
        if done.returncode != 0:
            names = " and ".join(path.name for path in SOURCES)
            raise RuntimeError(
                f"{cxx} failed to build {names} with {' '.join(flags)}:\n{done.stderr.strip()}"
            )
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
        log.info("built %s in %.1f s", target, time.perf_counter() - start)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    """Load a built kernel and declare its functions."""
    lib = ctypes.CDLL(str(path))
    lib.kcprnn_tall_isa.restype = ctypes.c_int
    lib.kcprnn_tall_isa.argtypes = []
    lib.kcprnn_tall_matmul.restype = None
    lib.kcprnn_tall_matmul.argtypes = [
        ctypes.c_void_p,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,  # x, n_b, n_e, xsb, xse, f
        ctypes.c_void_p,
        _I64,  # w, n_out
        ctypes.c_void_p,
        _I64,
        _I64,
        _I64,  # y, ysb, yse, ysg
        ctypes.c_int,  # threads
    ]
    lib.kcprnn_tall_weight_grad.restype = None
    lib.kcprnn_tall_weight_grad.argtypes = [
        ctypes.c_void_p,
        _I64,
        _I64,
        _I64,  # grad, m, gsm, gsg
        ctypes.c_void_p,
        _I64,
        _I64,
        _I64,  # x, xsm, f, n_out
        ctypes.c_void_p,
        ctypes.c_void_p,  # out, scratch
        ctypes.c_int,  # threads
    ]
    lib.kcprnn_inner_rows.restype = None
    lib.kcprnn_inner_rows.argtypes = [
        ctypes.c_void_p,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,  # z, n_b, n_e, zsb, zse, n_a, n_c
        ctypes.c_void_p,
        _I64,
        _I64,  # st, n_k, n_o
        ctypes.c_void_p,
        _I64,  # pt, n_m
        ctypes.c_void_p,
        _I64,  # out, osb
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,  # offsets, runs
        ctypes.c_void_p,
        ctypes.c_int,  # bias, threads
    ]
    lib.kcprnn_gather.restype = None
    lib.kcprnn_gather.argtypes = [
        ctypes.c_void_p,
        _I64,
        _I64,
        ctypes.c_int,  # in, n_b, isb, nd
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,  # sizes, strides, out
    ]
    from . import native_chain, native_dense, native_factor, native_rnn  # they import this module

    native_chain.declare(lib)
    native_rnn.declare(lib)
    native_dense.declare(lib)
    native_factor.declare(lib)
    return lib


def _library() -> ctypes.CDLL | None:
    """The process's kernel, built and loaded on first use; ``None`` where it cannot be."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib = None
            if os.environ.get("KCPRNN_NATIVE", "1") == "0":
                _state["error"] = "disabled by KCPRNN_NATIVE=0"
            else:
                try:
                    path = build()
                    lib = load(path)
                    _state["path"] = str(path)
                except (OSError, RuntimeError) as err:
                    _state["error"] = str(err)
                    log.warning(
                        "kcprnn: the compiled CPU kernels could not be built, so torch ops run "
                        "the same plans instead (results equal up to rounding): %s",
                        err,
                    )
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def _require() -> ctypes.CDLL:
    """The process's kernel, or a ``RuntimeError`` saying why there is none."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"kcprnn's native kernel is unavailable: {_state.get('error')}")
    return lib


def available() -> bool:
    """Whether the compiled kernel can run in this process (building it on first call)."""
    return _library() is not None


def info() -> dict[str, object]:
    """What :func:`available` found: ``available``, the ``isa`` (512 or 256 bits), the library's
    ``path``, or the ``error`` that made it unavailable."""
    lib = _library()
    if lib is None:
        return {"available": False, "error": _state.get("error")}
    return {"available": True, "isa": lib.kcprnn_tall_isa(), "path": _state.get("path")}


def fits(x: Tensor, *others: Tensor) -> bool:
    """Whether the kernels can take ``x`` (unit stride along its last axis, which is not empty)
    with ``others``: all float32 on CPU, and no autograd graph being recorded for them. The
    shapes are the caller's to check."""
    tensors = (x, *others)
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and x.shape[-1] > 0
        and (x.stride(-1) == 1 or x.shape[-1] == 1)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and available()
    )


def tall_matmul(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``out[b, e, :] = x[b, e, :] @ weight.T`` on the compiled kernel, for ``x`` ``(B, E, f)``
    with unit stride along ``f``, ``weight`` ``(g, f)`` and ``out`` ``(B, E, g)`` float32
    with any strides (a transposed view writes the transposed layout). Call only where
    :func:`fits` holds for ``x``, ``weight`` and ``out``; returns ``out``."""
    lib = _require()
    n_b, n_e, f = x.shape
    weight = weight.contiguous()  # (g, f)
    if weight.shape != (out.shape[2], f) or out.shape[:2] != (n_b, n_e):
        raise ValueError(
            f"tall_matmul shapes do not match: x {tuple(x.shape)}, weight "
            f"{tuple(weight.shape)}, out {tuple(out.shape)}"
        )
    _count(n_b * n_e * f * weight.shape[0])
    lib.kcprnn_tall_matmul(
        x.data_ptr(),
        n_b,
        n_e,
        x.stride(0),
        x.stride(1),
        f,
        weight.data_ptr(),
        weight.shape[0],
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        torch.get_num_threads(),
    )
    return out


def width() -> int:
    """Floats per vector of the built kernel: 16 (AVX-512) or 8 (AVX2)."""
    return _require().kcprnn_tall_isa() // 32


def inner_rows(
    z: Tensor,
    suffix_t: Tensor,
    n_k: int,
    prefix_t: Tensor,
    out: Tensor,
    offsets: tuple[Tensor, Tensor, Tensor],
    runs: bool,
    bias: Tensor | None = None,
) -> Tensor:
    """The two-chunk CP product of each row of ``z`` ``(B, E, a c)`` (unit stride along the
    last axis), written to ``out`` ``(B, ...)`` (contiguous) through offset tables: output
    ``(o, m)`` of row ``(b, e)`` goes to ``out.view(-1)[b * out.stride(0) + off_e[e] +
    off_o[o] + off_m[m]]``, plus ``bias`` (flat, the same offsets without the ``b`` term) when
    given. ``suffix_t`` is ``(c, k o)`` and ``prefix_t`` ``(a k, m)``, both contiguous;
    ``offsets`` are three int64 tensors ``(off_e, off_o, off_m)``; ``runs`` says that ``off_m``
    is contiguous within each vector (:func:`width`) of ``m``. Call only where :func:`fits`
    holds for ``z`` and the others; returns ``out``."""
    lib = _require()
    n_b, n_e, f = z.shape
    n_c, n_ko = suffix_t.shape
    n_ak, n_m = prefix_t.shape
    off_e, off_o, off_m = (t.contiguous() for t in offsets)
    n_a, n_o = f // max(n_c, 1), n_ko // n_k if n_k else 0
    if (
        f % max(n_c, 1)
        or n_ak != n_a * n_k
        or n_ko != n_k * n_o
        or off_e.numel() != n_e
        or off_o.numel() != n_o
        or off_m.numel() != n_m
        or not (suffix_t.is_contiguous() and prefix_t.is_contiguous() and out.is_contiguous())
        or out.shape[0] != n_b
    ):
        raise ValueError(
            f"inner_rows shapes do not match: z {tuple(z.shape)}, suffix_t "
            f"{tuple(suffix_t.shape)} with k={n_k}, prefix_t "
            f"{tuple(prefix_t.shape)}, out {tuple(out.shape)}, offsets "
            f"{[t.numel() for t in (off_e, off_o, off_m)]}"
        )
    _count(n_b * n_e * (f * n_ko + n_ak * n_o * n_m))
    lib.kcprnn_inner_rows(
        z.data_ptr(),
        n_b,
        n_e,
        z.stride(0),
        z.stride(1),
        n_a,
        n_c,
        suffix_t.data_ptr(),
        n_k,
        n_o,
        prefix_t.data_ptr(),
        n_m,
        out.data_ptr(),
        out.stride(0) if out.dim() else 0,
        off_e.data_ptr(),
        off_o.data_ptr(),
        off_m.data_ptr(),
        int(runs),
        bias.data_ptr() if bias is not None else None,
        torch.get_num_threads(),
    )
    return out


GATHER_DIMS = 32  # the kernel's limit on dimensions after merging


def gather(view: Tensor, out: Tensor) -> Tensor:
    """``out.copy_(view)`` on the compiled kernel, for ``view`` ``(B, ...)`` float32 with any
    strides (a permuted view of the rows) and ``out`` contiguous of the same shape. Dimensions
    that stay adjacent are merged first; the last one is copied as contiguous runs where its
    stride is 1. Call only where :func:`fits` holds for ``view``'s base data and ``out``;
    returns ``out``."""
    lib = _require()
    if view.shape != out.shape or not out.is_contiguous() or view.dim() < 1:
        raise ValueError(
            f"gather shapes do not match: view {tuple(view.shape)}, out "
            f"{tuple(out.shape)} (contiguous: {out.is_contiguous()})"
        )
    nd, sizes, strides = _gather_dims(tuple(view.shape[1:]), tuple(view.stride()[1:]))
    lib.kcprnn_gather(
        view.data_ptr(),
        view.shape[0],
        view.stride(0),
        nd,
        sizes.data_ptr(),
        strides.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


@functools.lru_cache(maxsize=64)
def _gather_dims(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, Tensor, Tensor]:
    """The kernel's dimensions for rows of ``shape`` and ``stride`` (cached: the walk gathers
    the same layout at every call): ``(nd, sizes, strides)``, adjacent dimensions merged,
    size-1 ones dropped, a last run of stride 1 and at least 3 dimensions."""
    dims: list[tuple[int, int]] = []  # (size, stride), merged from the last dimension
    for size, stride_ in zip(reversed(shape), reversed(stride), strict=True):
        if size == 1:
            continue
        if dims and stride_ == dims[-1][0] * dims[-1][1]:
            dims[-1] = (dims[-1][0] * size, dims[-1][1])
        else:
            dims.append((size, stride_))
    if not dims or dims[0][1] != 1:
        dims.insert(0, (1, 1))  # a run of 1
    while len(dims) < 3:
        dims.append((1, 0))
    if len(dims) > GATHER_DIMS:
        raise ValueError(
            f"gather needs at most {GATHER_DIMS} dimensions after merging, "
            f"got {len(dims)} from rows of shape {shape}"
        )
    dims.reverse()
    with torch.inference_mode(False):
        return (
            len(dims),
            torch.tensor([s for s, _ in dims], dtype=torch.int64),
            torch.tensor([t for _, t in dims], dtype=torch.int64),
        )


def tall_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` ``(g, f)`` on the compiled kernel, for ``grad`` ``(m, g)`` (any strides)
    and ``x`` ``(m, f)`` with unit stride along ``f``, both float32 on CPU: each thread sums
    its range of rows, then the partial sums are added. Call only where :func:`fits` holds for
    ``x`` and ``grad``."""
    lib = _require()
    m, f = x.shape
    if grad.dim() != 2 or grad.shape[0] != m:
        raise ValueError(
            f"tall_weight_grad shapes do not match: grad {tuple(grad.shape)}, x {tuple(x.shape)}"
        )
    n_out, threads = grad.shape[1], torch.get_num_threads()
    out = x.new_empty(n_out, f)  # (g, f)
    scratch = x.new_empty(threads, n_out, f)  # (t, g, f)
    _count(m * f * n_out)
    lib.kcprnn_tall_weight_grad(
        grad.data_ptr(),
        m,
        grad.stride(0),
        grad.stride(1),
        x.data_ptr(),
        x.stride(0),
        f,
        n_out,
        out.data_ptr(),
        scratch.data_ptr(),
        threads,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """``kcprnn build``: build (or find) the compiled kernels; print where, or why not."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="kcprnn build",
        description="Build kcprnn's compiled CPU kernels now (they are otherwise built when a "
        "kernel first runs) and print where the library is, or why it cannot be built.",
    )
    parser.parse_args(argv)
    if os.environ.get("KCPRNN_NATIVE", "1") == "0":
        print("kcprnn build: disabled by KCPRNN_NATIVE=0", file=sys.stderr)
        return 1
    try:
        path = build()
        lib = load(path)
    except (OSError, RuntimeError) as err:
        print(f"kcprnn build: failed, torch ops will be used instead:\n{err}", file=sys.stderr)
        return 1
    print(f"{path} ({lib.kcprnn_tall_isa()}-bit vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
