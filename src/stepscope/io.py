"""Safe file output (temporary file or folder, then rename), reading of trace/record files, and resumable JSONL."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import StepscopeError


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it, briefly: not something to do per file)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


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


def _probe_folder(folder: Path) -> str | None:
    """Why a new file cannot be created in the existing folder `folder` (None when it can): a real try, since
    permission bits do not tell the whole story (root, read-only mounts, /proc)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stepscope-probe.", dir=folder)
    except OSError as e:
        return f"cannot create files in {folder}: {e.strerror or type(e).__name__}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """Check, before any work, that an output can be written at `path`; a one-line error naming `what` (the
    option, e.g. "--out") otherwise. Returns `path` as a Path; creates nothing.

    `folder`: the output is a folder (written inside, or replaced whole), else a file (written whole or appended
    to). The checks: a file is not an existing folder and a folder not an existing file; the nearest existing
    ancestor is a folder (not a file, as in `notes.txt/out.jsonl`); a file can be created where the output goes
    (beside it, and inside an existing output folder); an existing output file is writable.
    """
    path = Path(path)
    shown = f"{what} {path}" if what else str(path)
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise StepscopeError(f"{shown}: is a file, expected a folder")
        if not folder and path.is_dir():
            raise StepscopeError(f"{shown}: is a folder, expected a file")
    if str(path) in ("", ".") or path == Path(path.anchor):
        parent = path
    else:
        parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StepscopeError(f"{shown}: cannot be written ({ancestor} is a file, not a folder)")
    why = _probe_folder(ancestor)
    if why is None and folder and path.is_dir():
        why = _probe_folder(path)
    if why is None and not folder and path.is_file() and not os.access(path, os.W_OK):
        why = f"{path}: permission denied"
    if why is not None:
        raise StepscopeError(f"{shown}: cannot be written ({why})")
    return path


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


def read_json_file(path: str | os.PathLike):
    """Parse a UTF-8 JSON file; a one-line error naming the file when it is missing or not valid JSON."""
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise StepscopeError(f"{path}: not valid JSON ({e.msg})") from None


def first_char(path: str | os.PathLike) -> str | None:
    """The first non-blank character of a file read as text (None: the file is empty or blank), e.g. to tell
    JSON from plain text before parsing; unreadable bytes count as characters."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[0]
    return None


def config_fields(d: dict | str, cls, what: str) -> dict:
    """The fields of the settings dataclass `cls` from JSON text or a dict (a copy); a one-line error naming
    `what` for text that is not JSON, JSON that is not an object, or a key `cls` has no field for."""
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{what} is not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise StepscopeError(f"{what} JSON must be an object")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise StepscopeError(f"unknown {what} key(s): {', '.join(unknown)}")
    return dict(d)


# the field names that hold a problem's question, in order of preference: records of evaluation tools
# (stepscope.trace), benchmark rows (stepscope.evaluate.problems) and `stepscope generate --input` all read this list
QUESTION_KEYS = ("question", "problem", "Question", "Problem", "prompt", "input", "query", "instruction")


def _parse_record(path: Path, number: int, line: bytes | str) -> dict:
    """One JSONL line as a dict; a clear error naming the file and the 1-based line number otherwise."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise StepscopeError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise StepscopeError(f"{path}: line {number} is not valid UTF-8") from None
    if not isinstance(rec, dict):
        raise StepscopeError(f"{path}: line {number} is not a JSON object")
    return rec


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a bad line is an error naming its number."""
    path = Path(path)
    return [_parse_record(path, i + 1, line) for i, line in enumerate(read_text_file(path).split("\n"))
            if line.strip()]


class JsonlLog:
    """A JSONL file of records that survives interruption: appended and flushed a batch at a time, repaired on
    reopening, read back incrementally.

    A write cut off by a kill leaves bytes after the last newline: `repair()` (called by `open()`) removes them,
    so a resumed run appends after the last whole record and loses or repeats nothing. `read_new()` returns
    only whole lines, so another process can follow a file that is still being written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh = None
        self._offset = 0  # bytes of whole lines read so far
        self._lines = 0  # lines read so far (for error messages)

    def repair(self) -> int:
        """Cut a cut-off last line (a write that a kill interrupted); returns how many bytes were cut."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            keep, block = size, 1 << 16
            while keep > 0:  # scan back in blocks for the last newline
                start = max(0, keep - block)
                f.seek(start)
                i = f.read(keep - start).rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                keep = start
            if keep < size:
                f.truncate(keep)
        return size - keep

    def read_new(self) -> list[dict]:
        """The records of the whole lines written since the last call (a partial last line waits for its end)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        out = []
        for line in data[:end].split(b"\n"):
            self._lines += 1
            if line.strip():
                out.append(_parse_record(self.path, self._lines, line))
        self._offset += end + 1
        return out

    def read(self) -> list[dict]:
        """Every record of the file's whole lines."""
        self._offset = self._lines = 0
        return self.read_new()

    def open(self, *, truncate: bool = False) -> JsonlLog:
        """Open for appending (creating the file; `truncate` starts it empty), after repairing a cut-off line."""
        if not truncate:
            self.repair()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w" if truncate else "a", encoding="utf-8")
        return self

    def append(self, records: Iterable[dict]) -> int:
        """Append records as one write, flushed and fsync'ed; returns how many were written."""
        if self._fh is None:
            raise StepscopeError(f"{self.path}: open the log before appending to it")
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        if lines:
            self._fh.write("".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return len(lines)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
