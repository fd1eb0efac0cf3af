"""Crash-safe training: real processes killed with SIGKILL (and Ctrl-C twice) at chosen moments,
each resumed with the same one command, ending bit-identical to an uninterrupted run.

The engine reports its phase to the file named by GOOGLENET_TRACE ("step-begin E S",
"val-begin E", "save-begin NAME", ...), which is how the harness picks its moments, and
GOOGLENET_SLOW_WRITE_S stretches each checkpoint write so that a kill lands inside one.
Run folders live in /dev/shm when it exists: this tests process kills, not power loss, and
tmpfs keeps the 86 MB checkpoints cheap.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from googlenet.checkpoint import load_checkpoint
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from tests.conftest import fake_cifar

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fp32 on one thread: fast, and bit-reproducible across processes.
SETTINGS = [
    "input_size=16",
    "batch_size=8",
    "epochs=2",
    "eval_every=1",
    "lr=0.05",
    "precision=fp32",
    "channels_last=false",
    "workers=1",
    "ema=true",  # every piece of state a resume restores: EMA and lookahead too
    "ema_decay=0.9",
    "lookahead_every=5",
    "dropout=0.3",
    "cutout=4",
    "checkpoint_every_s=1e-6",  # a checkpoint after every step
    "report=false",  # the end-of-run report: seconds per finished run, not what is tested
]


@pytest.fixture
def scratch(tmp_path):
    """A scratch folder in RAM when possible (see the module doc)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    folder = Path(tempfile.mkdtemp(prefix="googlenet-crash-", dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def check_all_readable(run: Path) -> None:
    """Every file a run keeps is whole: checkpoints verify, logs and configs parse, plots
    decode. Hidden .tmp files are a killed write's garbage (removed by the next start)."""
    for p in sorted(run.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix == ".safetensors":
            load_checkpoint(p)  # raises on a torn or corrupt file (SHA-256 checked)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            for line in p.read_text().splitlines():
                json.loads(line)
        elif p.suffix == ".csv":
            list(csv.reader(p.open()))
        elif p.suffix == ".toml":
            tomllib.loads(p.read_text())
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()


def train_state(run: Path) -> tuple[int, int] | None:
    """(epoch, step) the last complete checkpoint resumes from, None when there is none."""
    if not (run / "last.safetensors").is_file():
        return None
    st = load_checkpoint(run / "last.safetensors")[1].training
    assert st is not None
    return st.epoch, st.step


def wait_for_file(folder: Path, pattern: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert time.monotonic() < end, f"no {pattern} in {timeout} s"
        time.sleep(0.002)


class Proc:
    """`googlenet train` in a child process, with its trace file and stderr."""

    def __init__(self, scratch: Path, args: list[str], env: dict[str, str], n: int) -> None:
        self.trace = scratch / f"trace-{n}.txt"
        self.err_path = scratch / f"stderr-{n}.txt"
        env = dict(os.environ, **env, GOOGLENET_TRACE=str(self.trace))
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        with self.err_path.open("w") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "googlenet", "train", *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=scratch,
            )

    def lines(self) -> list[str]:
        try:
            return self.trace.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        """Block until the trace has a line starting with `prefix`; return it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            if self.p.poll() is not None:
                raise AssertionError(f"exited {self.p.returncode} before {prefix!r}: {self.err}")
            time.sleep(0.002)
        raise AssertionError(f"no {prefix!r} in {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.p.send_signal(sig)

    def finish(self, timeout: float = 120.0) -> int:
        return self.p.wait(timeout)

    @property
    def err(self) -> str:
        return self.err_path.read_text()


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(scratch):
    data = fake_cifar(scratch / "data")
    run = scratch / "run"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    first = ["--data", str(data), "--out", str(run), "--quiet", *sets]
    again = ["--resume", "--data", str(data), "--out", str(run), "--quiet"]
    slow = {"GOOGLENET_SLOW_WRITE_S": "1.0"}
    rng = np.random.default_rng()  # random moments: the result must not depend on them
    events: list[str] = []
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start a process; it must continue from the last complete checkpoint on disk."""
        expect = train_state(run) or (0, 0)
        p = Proc(scratch, args, env or {}, len(procs) + 1)
        procs.append(p)
        assert p.wait_for("start ") == f"start {expect[0]} {expect[1]}"
        return p

    def killed(p: Proc, what: str) -> None:
        p.kill()
        assert p.finish() == -signal.SIGKILL
        events.append(what)
        check_all_readable(run)

    # 1. before the first checkpoint: --resume then starts from the beginning, with a note
    p = start(first)
    killed(p, "before the first checkpoint")
    assert train_state(run) is None

    # 2. mid-step, a random moment into a step
    p = start(again)
    assert "no checkpoint yet, so the run starts from the beginning" in p.err
    p.wait_for("step-begin 0 2")
    time.sleep(rng.uniform(0, 0.05))
    killed(p, "mid-step")

    # 3. inside a checkpoint write (stretched to 1 s): the temp file is there, half written
    p = start(again, slow)
    p.wait_for("save-begin last")
    wait_for_file(run, ".last.safetensors.*.tmp")  # serialised and hashed; now writing
    time.sleep(rng.uniform(0, 0.3))
    assert list(run.glob(".last.safetensors.*.tmp")), "the kill must land inside the write"
    before = (run / "last.safetensors").read_bytes()
    killed(p, "during a checkpoint write")
    assert (run / "last.safetensors").read_bytes() == before  # the previous one, intact

    # 4. during validation (80 images: a wide window)
    p = start(again)
    p.wait_for("val-begin 0")
    time.sleep(rng.uniform(0, 0.02))
    killed(p, "during validation")
    assert "val-end 0" not in p.lines(), "the kill must land inside validation"

    # 5. Ctrl-C twice during a (slow: 5 s) checkpoint write: exits at once, 130, nothing torn
    p = start(again, {"GOOGLENET_SLOW_WRITE_S": "5"})
    p.wait_for("step-begin 1")
    p.wait_for("save-begin last")
    wait_for_file(run, ".last.safetensors.*.tmp")
    p.kill(signal.SIGINT)
    # Wait for the first to be seen, as a person would: two SIGINTs that arrive before Python
    # runs its handler count as one (the C-level flag is set twice), on a busy machine too.
    end = time.monotonic() + 30
    while "finishing the current step" not in p.err:
        assert time.monotonic() < end and p.p.poll() is None, p.err
        time.sleep(0.005)
    t0 = time.monotonic()
    p.kill(signal.SIGINT)
    assert p.finish() == 130
    # at once: a graceful stop would first finish this write and save again (10 s)
    assert time.monotonic() - t0 < 4, ("a second Ctrl-C exits at once", p.err, p.lines())
    assert "SIGINT again: exiting at once" in p.err
    events.append("Ctrl-C twice, during a checkpoint write")
    check_all_readable(run)

    # 6. mid-step in epoch 2, at a random step
    p = start(again)
    p.wait_for(f"step-begin 1 {int(rng.integers(3, 6))}")
    time.sleep(rng.uniform(0, 0.05))
    killed(p, "mid-step, epoch 2")

    # the same one command finishes the run
    p = start(again)
    assert p.finish() == 0, p.err
    check_all_readable(run)

    # an uninterrupted run with the same config, in this process (same thread count)
    threads = torch.get_num_threads()
    try:
        cfg = resolve_config(overrides=[*SETTINGS, f"out={scratch / 'straight'}"])
        train(cfg, data_root=data, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, _ = load_checkpoint(scratch / "straight" / "last.safetensors")
    b, _ = load_checkpoint(run / "last.safetensors")
    for group in ("model", "ema", "optim"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}/{k}"

    def untimed(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert untimed(run / "metrics.jsonl") == untimed(scratch / "straight" / "metrics.jsonl")
    assert len(events) == 6
    print("interruptions survived:", events)
