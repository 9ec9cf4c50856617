"""The safetensors file format, read and written with torch and the standard library only.

A file is an 8-byte little-endian header length, a JSON header that lists every tensor (dtype,
shape, byte range) and carries string metadata (``__metadata__``), then the raw little-endian
tensor bytes. It is implemented here rather than through the optional ``safetensors`` package:
the format is small (this module is the whole of it), the core library keeps torch and numpy as
its only dependencies, and every check on an untrusted header happens in one place before a byte
of tensor data is used. The files are standard safetensors files (the tests read ours with the
``safetensors`` package and its files with :func:`read_safetensors`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_HEADER_BYTES",
    "LoadError",
    "read_safetensors",
    "write_safetensors",
    "write_text_atomic",
]

MAX_HEADER_BYTES = 100_000_000
"""Largest JSON header accepted (the ``safetensors`` package's limit)."""

# safetensors dtype names <-> torch dtypes
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class LoadError(ValueError):
    """A file :func:`load` or :func:`read_safetensors` refuses; the message says why."""


# --- the safetensors format -------------------------------------------------------------------


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("kcprnn reads and writes safetensors files on little-endian hosts only")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> tensor, any device) and string ``metadata`` to ``path`` in the
    safetensors format, atomically (a temporary file in the same folder, then a rename)."""
    _check_little_endian()
    path = Path(path)
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    blobs: list[bytes] = []
    offset = 0
    # widest dtypes first, so every tensor starts at a multiple of its item size
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    for name in order:
        t = tensors[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned
    _write_atomic(path, [len(head).to_bytes(8, "little"), head, *blobs])


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _write_atomic(Path(path), [text.encode()])


def _write_atomic(path: Path, chunks: list[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sniff(path: Path, start: bytes) -> None:
    """Refuse the formats that hold pickles, by their first bytes."""
    if start.startswith(b"PK\x03\x04"):
        raise LoadError(
            f"{str(path)!r} is a zip archive (torch.save's format), which holds a pickle; "
            "loading a pickle can run arbitrary code, so kcprnn never does. Load it with torch "
            "only if you trust its source, then write it again with kcprnn.save"
        )
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise LoadError(
            f"{str(path)!r} is a pickle file (torch.save's legacy format or pickle.dump); "
            "loading a pickle can run arbitrary code, so kcprnn never does"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise LoadError(f"the header names {key!r} twice")
        out[key] = value
    return out


def _read_header(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check the header: ``(entries, metadata, start of the tensor data)``."""
    size = len(data)
    n = int.from_bytes(data[:8], "little") if size >= 8 else -1
    if not 0 <= n <= MAX_HEADER_BYTES:
        # not a safetensors length field: name the formats that hold pickles, by their first bytes
        _sniff(path, data[:8])
        raise LoadError(
            f"{str(path)!r} is not a safetensors file: "
            + (
                f"{size} bytes, shorter than the 8-byte header length (an empty or truncated file)"
                if size < 8
                else f"its first 8 bytes give a header length of {n:,} bytes"
            )
        )
    if 8 + n > size:
        raise LoadError(
            f"{str(path)!r} is not a valid safetensors file: its header length field says "
            f"{n:,} bytes but the file holds {size - 8:,} bytes after it (a truncated file, or "
            "not a safetensors file)"
        )
    raw = data[8 : 8 + n]
    if not raw.lstrip(b" ").startswith(b"{"):
        raise LoadError(f"{str(path)!r} is not a safetensors file: its header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadError(
            f"{str(path)!r}: the safetensors header is not valid JSON ({err})"
        ) from None
    if not isinstance(header, dict):
        raise LoadError(f"{str(path)!r}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise LoadError(f"{str(path)!r}: __metadata__ must map strings to strings")
    return header, meta, 8 + n


def _check_entries(path: Path, header: dict[str, Any], available: int) -> None:
    """Every entry well formed, its byte range matching its dtype and shape, the ranges tiling
    the data exactly (no gap, no overlap, nothing after the last one)."""
    spans = []
    for name, entry in header.items():
        where = f"{str(path)!r}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise LoadError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise LoadError(f"{where}: unsupported dtype {dtype!r}; known: {sorted(_DTYPES)}")
        ints = (shape, offsets)
        if not all(isinstance(v, list) and all(type(x) is int and x >= 0 for x in v) for v in ints):
            raise LoadError(f"{where}: shape and data_offsets must be lists of ints >= 0")
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise LoadError(f"{where}: data_offsets must be [begin, end], got {offsets}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise LoadError(
                f"{where}: shape {shape} of {dtype} needs {nbytes:,} bytes but data_offsets "
                f"{offsets} give {offsets[1] - offsets[0]:,}"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise LoadError(
                f"{str(path)!r}: tensor {name!r} starts at byte {begin:,} of the data, expected "
                f"{end:,} (the byte ranges overlap or leave a gap)"
            )
        end = stop
    if end > available:
        raise LoadError(
            f"{str(path)!r} is truncated: the header describes {end:,} bytes of tensor data, "
            f"the file holds {available:,}"
        )
    if end < available:
        raise LoadError(
            f"{str(path)!r}: {available - end:,} bytes follow the last tensor (the header does "
            "not describe the whole file)"
        )


def read_safetensors(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``. The header is checked in full (sizes,
    byte ranges, dtypes) before any tensor is built; a pickle file, a truncated file or a header
    that disagrees with the file raises :class:`LoadError`."""
    _check_little_endian()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    data = path.read_bytes()
    header, meta, start = _read_header(path, data)
    _check_entries(path, header, len(data) - start)
    tensors = {}
    for name, entry in header.items():
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, stop = (start + o for o in entry["data_offsets"])
        if begin == stop:
            t = torch.empty(shape, dtype=dtype)
        else:  # a copy of the bytes: aligned, writable, not tied to the whole file's buffer
            t = torch.frombuffer(bytearray(data[begin:stop]), dtype=dtype).reshape(shape)
        tensors[name] = t.to(device)
    return tensors, meta
