"""Writing results so that nothing is ever half-written: temporary path first, rename when complete (files and
whole folders, with the crash recovery of folders); reading JSON with clear errors. What is written gets the modes a
plain write would (0666 / 0777 less the user's umask), never a temporary file's private 0600."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from captune.errors import CaptuneError


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create `.NAME.XXXXXXXX.tmp` beside `path` for writing, with the mode a plain `open(path, "w")` would give it:
    0666 less the umask, applied by the kernel. (`tempfile.mkstemp` creates 0600, which would make every output
    private to its writer: a merged model others on the machine cannot read.)"""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_file(path: str | Path, binary: bool = False, sync: bool = True) -> Iterator[IO[Any]]:
    """Yield a file open for writing (text in UTF-8, or `binary`) at a temporary path beside `path`; when the block
    completes it is flushed, synced to disk (`sync`) and renamed `path`, so readers never see a partial file; when the
    block raises it is deleted. The file gets the umask's mode, as a plain write would; a replaced `path` too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so readers never see a partial file."""
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the file given the mode a plain write would give it: safetensors (0.8 here) writes
    through a private temporary file (0600) renamed into place, which would hide the weights from other users."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    give_plain_mode(path)


def give_plain_mode(path: str | Path) -> None:
    """Set the permissions of the file `path` to what a plain `open(path, "w")` gives a new file: 0666 less the
    umask. For files a library wrote through its own private temporary file."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only set it, for all threads at once)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


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


# ------------------------------------------------------------------------ folders written aside, renamed when complete
#
# One mechanism for every folder captune writes whole (convert, merge and dataset outputs; training checkpoints):
# `write_dir` writes it as `.NAME.tmp-PID` and renames it NAME when complete, setting an existing NAME aside as
# `.NAME.old-PID` first; `delete_dir` renames NAME to `.NAME.deleting-PID` before deleting it; `recover_dirs` tidies
# what a writer killed by a signal (kill -9: no cleanup runs) left. A folder is never half-written or half-deleted
# under its final name, and a complete one is never lost: at any kill point NAME is the previous folder, the new one,
# or (between the two renames of a replacement) absent with the previous one whole as `.NAME.old-PID`.

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|deleting)(?:-(?P<pid>\d+)(?:-[^.]*)?)?\Z")


def _aside(final: Path, kind: str) -> Path:
    """`.NAME.KIND-PID` beside `final`: where this process writes (tmp), sets aside (old) or deletes (deleting) it."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _writer_gone(pid: str | None) -> bool:
    """Whether the writer of a leftover is gone: a dead process, or this one (its PID reused after a restart;
    this process recovers before it writes). Without a PID (older captune) the writer cannot be told."""
    return pid is not None and (int(pid) == os.getpid() or not _alive(int(pid)))


def recover_dirs(parent: str | Path, name: str | None = None, *, writers_gone: bool = False) -> None:
    """Tidy the leftovers of killed `write_dir` / `delete_dir` calls in `parent` (those of folder `name`, or all).

    `.NAME.old-PID` is a complete NAME set aside to be replaced: renamed back to NAME when NAME is missing (killed
    between the two renames), deleted when NAME exists (killed after them). `.NAME.tmp-PID` (half-written or never
    renamed) and `.NAME.deleting-PID` (half-deleted) are deleted. Only leftovers whose writer is gone are touched
    (`_writer_gone`): another process may be writing NAME now. `writers_gone=True` is for a caller that knows no
    process writes into `parent` now (a training run's folder; `train.state.recover_checkpoints`): every leftover
    is stale, those without a PID (older captune's `.NAME.tmp`, `.NAME.old`, `.NAME.deleting`) included. Idempotent,
    and safe when several processes recover `parent` at once.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or (name is not None and m["name"] != name) or not p.is_dir():
            continue
        if not (writers_gone or _writer_gone(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == "old" and not final.exists():
            with contextlib.suppress(FileNotFoundError):  # another process put it back first
                os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def write_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty folder `.NAME.tmp-PID` beside `final`; when the block completes it becomes `final` (an existing
    `final` is set aside as `.NAME.old-PID` for the rename, then deleted); when the block raises it is deleted.

    Run `recover_dirs` first: a `.NAME.old-*` left by a killed writer may be the only copy of NAME. The folder is
    made by a plain mkdir (0777 less the umask): write its files with `atomic_file` or plain writes, never with
    `tempfile`'s private 0600 / 0700.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(final, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this PID
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = _aside(final, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def delete_dir(path: str | Path) -> None:
    """Delete a folder, renamed `.NAME.deleting-PID` first: a kill half-way leaves no half-deleted NAME."""
    path = Path(path)
    trash = _aside(path, "deleting")
    shutil.rmtree(trash, ignore_errors=True)  # left by an earlier process with this PID
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """Refuse to overwrite a non-empty folder unless `force` (after `recover_dirs` of its leftovers)."""
    out = Path(out)
    recover_dirs(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise CaptuneError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CaptuneError("folder exists and is not empty (pass --force to replace it)", out)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """`write_dir` for a command's output folder: after `check_output_dir` (its leftovers tidied; a non-empty `out`
    refused unless `force`). A kill leaves `out` absent, the previous one or the new one, never half-written; the
    next writer of `out` tidies what it left beside it."""
    out = check_output_dir(out, force)
    with write_dir(out) as tmp:
        yield tmp
