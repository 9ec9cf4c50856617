"""Reading speech audio: NIST SPHERE (TIMIT's ``.WAV``, TED-LIUM's ``.sph``) and RIFF WAV.

Audio is read with ``soundfile`` (libsndfile reads uncompressed SPHERE and RIFF); where it cannot
read a SPHERE file, ``sphfile`` (a numpy-only SPHERE reader) is tried. Before reading, a SPHERE
header is checked against the file size, so a truncated file raises :class:`CorruptAudioError`
instead of returning a short waveform. SPHERE files compressed with ``shorten`` are refused with a
hint (decompress them with ``sph2pipe`` first).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["CorruptAudioError", "read_audio", "read_sphere_header", "write_sphere"]

_SPHERE_MAGIC = b"NIST_1A\n"


class CorruptAudioError(ValueError):
    """An audio file that cannot be read in full (truncated, bad header, unknown coding)."""


def read_sphere_header(path: str | os.PathLike) -> dict[str, str | int | float] | None:
    """The fields of a NIST SPHERE header (``sample_count``, ``sample_rate``, ...) plus
    ``header_bytes``; ``None`` if ``path`` is not a SPHERE file.

    Raises:
        CorruptAudioError: the header is malformed.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        if not head.startswith(_SPHERE_MAGIC):
            return None
        try:
            header_bytes = int(head[8:16].strip())
        except ValueError:
            raise CorruptAudioError(
                f"{path}: SPHERE header size {head[8:16]!r} is not a number"
            ) from None
        text = f.read(max(header_bytes - 16, 0)).decode("ascii", errors="replace")
    fields: dict[str, str | int | float] = {"header_bytes": header_bytes}
    for line in text.splitlines():
        parts = line.split(None, 2)
        if not parts or parts[0] == "end_head":
            if parts:
                break
            continue
        if len(parts) < 3 or not parts[1].startswith("-"):
            continue
        name, kind, value = parts
        try:
            fields[name] = int(value) if kind == "-i" else float(value) if kind == "-r" else value
        except ValueError:
            raise CorruptAudioError(
                f"{path}: SPHERE field {name} has bad value {value!r}"
            ) from None
    return fields


def _check_sphere(path: Path, header: dict[str, str | int | float]) -> None:
    coding = str(header.get("sample_coding", "pcm"))
    if "shorten" in coding or "wavpack" in coding:
        raise CorruptAudioError(
            f"{path}: SPHERE sample_coding {coding!r} is compressed; decompress it first "
            "(e.g. `sph2pipe -f sph in.sph out.sph`)"
        )
    count, width = header.get("sample_count"), header.get("sample_n_bytes", 2)
    channels = header.get("channel_count", 1)
    size = path.stat().st_size
    if size < int(header["header_bytes"]) or not isinstance(count, int):
        raise CorruptAudioError(
            f"{path}: truncated SPHERE file ({size} bytes, no complete header with a sample_count)"
        )
    if isinstance(width, int) and isinstance(channels, int):
        need = int(header["header_bytes"]) + count * width * channels
        if size < need:
            raise CorruptAudioError(
                f"{path}: truncated SPHERE file ({size} bytes, the header announces {need})"
            )


def read_audio(
    path: str | os.PathLike, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, int]:
    """Samples ``start:stop`` of the first channel of ``path`` as float32 in [-1, 1], and the
    sample rate.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptAudioError: the file is truncated or cannot be decoded.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist")
    header = read_sphere_header(path)
    if header is not None:
        _check_sphere(path, header)
    try:
        data, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
        return np.ascontiguousarray(data[:, 0]), int(rate)
    except (RuntimeError, sf.LibsndfileError) as exc:
        if header is None:
            raise CorruptAudioError(f"{path}: cannot decode audio ({exc})") from None
        error = exc
    try:  # libsndfile refused a SPHERE file: sphfile reads SPHERE with numpy
        from sphfile import SPHFile  # type: ignore[import-untyped]

        sph = SPHFile(str(path))
        content = np.asarray(sph.content)
        if content.ndim > 1:
            content = content[:, 0]
        scale = float(np.iinfo(content.dtype).max + 1) if content.dtype.kind == "i" else 1.0
        return (content[start:stop].astype(np.float32) / scale), int(sph.format["sample_rate"])
    except Exception as exc:  # noqa: BLE001 - any failure of the fallback reader
        raise CorruptAudioError(
            f"{path}: cannot decode SPHERE audio (soundfile: {error}; sphfile: {exc})"
        ) from None


def write_sphere(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """Write 16-bit mono ``samples`` (float in [-1, 1] or int16) as an uncompressed NIST SPHERE
    file with a 1024-byte header, as TIMIT and TED-LIUM ship them."""
    x = np.asarray(samples)
    if x.dtype.kind == "f":
        x = np.round(np.clip(x, -1.0, 1.0) * 32767.0)
    pcm = x.astype("<i2")
    fields = [
        "database_id -s5 kcprn",
        f"sample_count -i {len(pcm)}",
        f"sample_rate -i {sample_rate}",
        "channel_count -i 1",
        "sample_n_bytes -i 2",
        "sample_byte_format -s2 01",
        "sample_coding -s3 pcm",
        "sample_sig_bits -i 16",
        "end_head",
    ]
    text = ("NIST_1A\n   1024\n" + "\n".join(fields) + "\n").encode("ascii")
    header = text + b" " * (1024 - len(text))
    Path(path).write_bytes(header + pcm.tobytes())
