"""Run folders: where a training run writes, and the rules that keep one run from destroying
another.

- Without --out a run goes to runs/<recipe>, or the next free runs/<recipe>-2, -3, ... (as
  ultralytics' exp2 and Lightning's version_N), so `make train` can be run again and again.
- An explicit --out that holds a run (a config.toml or a checkpoint) is refused unless the run
  is resumed or --overwrite is given; --overwrite removes that run's files first.
- A lock file names the process that owns the folder; a second run is refused while that
  process lives, and a lock left by a dead process is taken over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from googlenet.errors import UserError

RUNS_ROOT = Path("runs")
LOCK_NAME = ".lock"
# Files that make a folder "hold a run": refused as a fresh --out without --overwrite.
MARKERS = ("config.toml", "last.safetensors", "best.safetensors", "previous.safetensors")
# What a run writes (and what it derives later), removed by --overwrite. Anything else in the
# folder is the user's and stays.
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "metrics.csv",
    "loss.png",
    "accuracy.png",
    "val_predictions.csv",
    "report.html",
)
RUN_GLOBS = ("*.safetensors", "last.json", "best.json", "previous.json", "*.onnx", "*.pt")
RUN_DIRS = "eval-*"


def holds_run(folder: str | Path) -> bool:
    """True when `folder` holds a run's config or a checkpoint."""
    folder = Path(folder)
    return folder.is_dir() and (
        any((folder / m).is_file() for m in MARKERS) or any(folder.glob("*.safetensors"))
    )


def _numbered(base: Path) -> list[tuple[int, Path]]:
    """base (as 1) and base-2, base-3, ... that exist, in number order."""
    found = [(1, base)] if base.exists() else []
    if base.parent.is_dir():
        pattern = re.compile(re.escape(base.name) + r"-(\d+)")
        for p in base.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) >= 2:
                found.append((int(m.group(1)), p))
    return sorted(found)


def next_free(base: str | Path) -> Path:
    """base when it holds no run, else base-N for the first N >= 2 (after the highest taken)
    that holds none: numbers only go up, so the newest run always has the highest one."""
    base = Path(base)
    taken = [n for n, p in _numbered(base) if holds_run(p) or (p / LOCK_NAME).exists()]
    if not taken:
        return base
    return base.with_name(f"{base.name}-{max(taken) + 1}")


def latest(base: str | Path) -> Path | None:
    """The highest-numbered of base, base-2, ... that holds a run (or a lock), else None."""
    runs = [p for _, p in _numbered(Path(base)) if holds_run(p) or (p / LOCK_NAME).exists()]
    return runs[-1] if runs else None


def choose(out: str | Path | None, recipe: str, *, resume: bool, overwrite: bool) -> Path:
    """The run folder for a new or resumed run (see the module doc); UserError when refused."""
    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if not out:
        base = RUNS_ROOT / recipe
        if resume:  # the newest run; none yet: a fresh one (the engine notes it)
            return latest(base) or next_free(base)
        return base if overwrite else next_free(base)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    if holds_run(folder) and not (resume or overwrite):
        raise UserError(
            f"{folder}: already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    return folder


def remove_run_files(folder: str | Path) -> list[Path]:
    """Delete what a run wrote in `folder` (RUN_FILES, checkpoints, exports, eval-* reports);
    the user's other files stay. Returns what was removed."""
    folder = Path(folder)
    gone: list[Path] = []
    if not folder.is_dir():
        return gone
    paths = [folder / n for n in RUN_FILES] + [p for g in RUN_GLOBS for p in folder.glob(g)]
    for p in paths:
        if p.is_file():
            p.unlink()
            gone.append(p)
    for d in folder.glob(RUN_DIRS):
        if d.is_dir():
            shutil.rmtree(d)
            gone.append(d)
    return gone


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Temp files (.NAME.XXXX.tmp) left by a write that a kill interrupted; the real files
    were never touched (writes are atomic), so these are garbage."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --- the lock ---------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name in (...) may hold spaces


def _alive(owner: dict) -> bool:
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """RUN/.lock holding {"pid", "host", "started", "argv"} while a run owns the folder."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False
        self.note: str | None = None  # set when a dead process's lock was taken over

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _start_time(os.getpid()),
            "argv": sys.argv,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and _alive(owner):
                    raise UserError(
                        f"{self.path.parent}: in use by process {owner.get('pid')} on "
                        f"{owner.get('host')} (lock file {self.path}); wait for it to end or "
                        "stop it, or choose another --out"
                    ) from None
                who = f"process {owner.get('pid')}" if owner else "an unreadable lock"
                self.note = f"took over {self.path} from {who}, which is no longer running"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the run lock (another run keeps taking it)")

    def owner(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner is None or owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
