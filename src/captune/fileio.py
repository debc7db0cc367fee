"""Writing results so that nothing is ever half-written: temporary path first, rename when complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captune.errors import CaptuneError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or malformed file into one clear CaptuneError."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptuneError("file not found", path) from None
    except json.JSONDecodeError as e:
        raise CaptuneError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaptuneError(f"cannot read: {e}", path) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_output_dir(out: str | Path) -> None:
    """Tidy what an `atomic_dir` writer of `out` killed by a signal (kill -9: no cleanup runs) left beside `out`.

    `.out.old-PID` is the previous `out`, set aside by the first of the two renames that replace it: renamed back
    when `out` is missing (killed between the renames), deleted when `out` exists (killed after them).
    `.out.tmp-PID-*` (a half-written or never renamed new `out`) is deleted. Only leftovers of processes that are no
    longer alive are touched; temporary folders without a PID (older captune) are left alone.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for p in sorted(out.parent.iterdir()):
        m = re.fullmatch(r"tmp-(\d+)-.*|old-(\d+)", p.name[len(prefix):]) if p.name.startswith(prefix) else None
        if not m or not p.is_dir() or _alive(int(m.group(1) or m.group(2))):
            continue
        if m.group(2) and not out.exists():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """Refuse to overwrite a non-empty folder unless `force` (after `recover_output_dir`)."""
    out = Path(out)
    recover_output_dir(out)
    if out.exists() and not out.is_dir():
        raise CaptuneError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CaptuneError("folder exists and is not empty (pass --force to replace it)", out)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any failure it is removed.

    A process killed half-way leaves only a `.out.tmp-PID-*` folder beside `out`, never a half-written `out`; one
    killed between the two renames that replace an existing `out` leaves it as `.out.old-PID`. The next writer of
    `out` tidies both (`recover_output_dir`), which is why the folders carry the writer's PID.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
