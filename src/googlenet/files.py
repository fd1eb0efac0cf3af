"""Atomic file writes: readers see the old file or the whole new one, never half of it.

Every file a run keeps (checkpoints, logs, reports, exports, listings) is written here: temp
file, fsync, rename, then fsync of the folder, so a killed process or a full disk never leaves
a torn file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from googlenet.errors import UserError

SLOW_WRITE_ENV = "GOOGLENET_SLOW_WRITE_S"  # tests: seconds to stall inside each checkpoint write


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write(path: Path, f: Any, data: bytes | memoryview) -> None:
    """Write all of `data` to the open temp file `f` (one place, so tests can inject faults)."""
    delay = float(os.environ.get(SLOW_WRITE_ENV) or 0)
    if delay and path.suffix == ".safetensors":  # stall half-way, so a test can kill us here
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        time.sleep(delay)
        data = memoryview(data)[half:]
    f.write(data)


def atomic_write_bytes(
    path: str | Path, data: bytes | memoryview, keep_previous: str | Path | None = None
) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half.

    With keep_previous, the file being replaced is kept under that name (replacing it), and
    `path` exists at every moment. The new file gets the mode the umask gives (as open()
    would), not mkstemp's 0600. A failed write (e.g. a full disk) removes its temp file,
    leaves `path` as it was, and raises a UserError naming the file and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            _write(path, f, data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.is_file():
            _keep(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(
                f"{path}: cannot write ({e.strerror or e}); the previous {path.name} (if any) "
                "is unchanged"
            ) from e
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(dfd)


def _keep(path: Path, previous: Path) -> None:
    """previous := path, leaving path in place (a hard link, renamed over previous)."""
    link = previous.with_name(f".{previous.name}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # no hard links here (some network/FAT file systems): copy instead
        link.unlink(missing_ok=True)
        shutil.copyfile(path, link)
        os.replace(link, previous)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
