"""Safe file output (temporary file or folder, then rename) and reading of trace/record files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import StepscopeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed.

    A folder already at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 file; a clear one-line error for a missing file or bytes that are not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StepscopeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise StepscopeError(f"{path}: is a folder, expected a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StepscopeError(f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def read_jsonl(path: str | os.PathLike, tolerate_truncated_last: bool = False) -> list[dict]:
    """Records of a JSONL file; a bad line is an error naming its number (a truncated last line may be skipped)."""
    lines = read_text_file(path).split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_truncated_last and i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1:]):
                break
            raise StepscopeError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise StepscopeError(f"{path}: line {i + 1} is not a JSON object")
        out.append(rec)
    return out
