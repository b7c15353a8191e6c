"""Text files a user hands us: strict UTF-8, an optional size bound, one-line errors."""

from __future__ import annotations

from pathlib import Path

from .errors import EmdpoError


def utf8_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    """`invalid UTF-8: byte 0xff at line 3, column 7` for a failed `data.decode('utf-8')`."""
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return f"invalid UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column}"


def read_text(path: Path, *, max_bytes: int | None = None, error: type[EmdpoError] = EmdpoError) -> str:
    """The UTF-8 text of `path`. OSError as `open` raises it; `error` (naming the file) when the
    file is larger than `max_bytes` or is not UTF-8."""
    with open(path, "rb") as fh:
        data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes; is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {utf8_problem(data, exc)}") from None
