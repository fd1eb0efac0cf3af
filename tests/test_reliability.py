"""Reliability guarantees that are not fuzzing or kill tests (see docs/reliability.md):
no loader runs code from data, known defects stay fixed."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from googlenet import checkpoint, files
from googlenet.checkpoint import load_checkpoint
from googlenet.cli import main
from googlenet.data import ArrayDataset
from googlenet.errors import UserError
from googlenet.training import loop
from googlenet.training.config import resolve_config
from googlenet.training.interrupt import Interrupted
from googlenet.training.state import Run


class Trap:
    """Unpickling this creates the file `path`: proof that code from the data ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def trap_bytes(sentinel: Path) -> bytes:
    payload = pickle.dumps({b"data": Trap(sentinel), b"labels": [0]}, protocol=4)
    pickle.loads(payload)  # the trap is real: plain pickle runs it
    assert sentinel.exists()
    sentinel.unlink()
    return payload


def test_booby_trapped_cifar_python_batches_are_refused(tmp_path):
    from googlenet.data import load_cifar

    sentinel = tmp_path / "pwned"
    payload = trap_bytes(sentinel)
    folder = tmp_path / "plain" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(payload)
    with pytest.raises(UserError, match=r"data_batch_1: .*refusing to load io\.open"):
        load_cifar(tmp_path / "plain", "cifar10", "train")
    with pytest.raises(UserError, match=r"batches\.meta|test_batch"):
        load_cifar(tmp_path / "plain", "cifar10", "test")
    # the same inside the official archive, read in place
    archive = tmp_path / "tar" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz:.*refusing"):
        load_cifar(tmp_path / "tar", "cifar10", "train")
    assert not sentinel.exists()


def test_booby_trapped_pth_is_refused_by_import_torchvision(tmp_path):
    from googlenet.cli import main

    sentinel = tmp_path / "pwned"
    trap_bytes(sentinel)
    pth = tmp_path / "googlenet-1378be20.pth"
    torch.save({"conv1.conv.weight": torch.zeros(1), "evil": Trap(sentinel)}, pth)
    assert not sentinel.exists()
    with pytest.raises(UserError, match=r"googlenet-1378be20\.pth: not a readable weights"):
        from googlenet.torchvision_weights import convert_torchvision

        convert_torchvision(pth, tmp_path / "out")
    assert main(["import-torchvision", str(pth), "--out", str(tmp_path / "out")]) == 2
    assert not sentinel.exists() and not (tmp_path / "out" / "best.safetensors").exists()


def test_export_tolerance_is_relative_to_the_logit_scale():
    from googlenet.infer.export import verify

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(1e4)  # logits in the thousands
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert scale > 1e3

    def rounded(t):  # an exact export, up to fp32 rounding at this scale (relative 1e-7)
        with torch.no_grad():
            return model(t) * (1 + 1e-7)

    limits: dict[str, float] = {}
    diffs = verify(model, rounded, {"x": x}, limits=limits)
    assert diffs["x"] > 1e-4  # the old absolute 1e-4 refused this valid export
    assert limits["x"] == pytest.approx(1e-4 * scale)

    def wrong(t):  # a real difference (1% of the scale) is still caught
        with torch.no_grad():
            return model(t) + 0.01 * scale

    with pytest.raises(UserError, match="exceeds"):
        verify(model, wrong, {"x": x})


def test_run_files_follow_the_umask(tmp_path):
    from googlenet.files import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.txt", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


# --- training: interrupts, disk full, checksums, run folders -----------------------------------

# One thread: fast, and far less hurt than two by a busy machine (OpenMP spin-waits).
TINY = ["input_size=16", "batch_size=8", "lr=0.03", "precision=fp32", "channels_last=false",
        "dropout=0.3", "ema=true", "ema_decay=0.9", "checkpoint_every_s=0",
        "workers=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # workers=1 sets it for the process; give it back
    yield
    torch.set_num_threads(n)


def synth(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, y, ["a", "b", "c", "d"])


DATA = {"train_set": synth(32, 0), "val_set": synth(8, 1)}


def cfg_at(out: Path | None, *extra: str):
    return resolve_config(overrides=[*TINY, *([f"out={out}"] if out else []), *extra])


def signal_at(monkeypatch, event: str, signum: int) -> None:
    """Send `signum` to this process when the loop reaches `event` (e.g. "step-begin 0 2")."""
    real = Run.trace

    def trace(self, e: str) -> None:
        real(self, e)
        if e == event:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Run, "trace", trace)


def same_weights(a: Path, b: Path) -> None:
    ga, _ = load_checkpoint(a)
    gb, _ = load_checkpoint(b)
    for group in ("model", "ema", "optim"):
        assert ga[group].keys() == gb[group].keys()
        for k in ga[group]:
            assert torch.equal(ga[group][k], gb[group][k]), f"{group}/{k}"


def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, monkeypatch):
    straight = loop.train(cfg_at(tmp_path / "a", "epochs=2"), progress=False, **DATA)
    before = signal.getsignal(signal.SIGINT)  # default, or ignored when started in background
    signal_at(monkeypatch, "step-begin 1 2", signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        loop.train(cfg_at(tmp_path / "b", "epochs=2"), progress=False, **DATA)
    assert info.value.exit_code == 130
    assert f"Resume with: googlenet train --resume --out {tmp_path / 'b'}" in str(info.value)
    _, meta = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert meta.training.epoch == 1 and meta.training.step == 3  # step done
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"resuming .* from epoch 2 step 3/4"):
        resumed = loop.train(cfg_at(tmp_path / "b", "epochs=2"), resume=True, progress=False,
                               **DATA)  # fmt: skip
    same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert [r["train_acc"] for r in resumed.history] == [r["train_acc"] for r in straight.history]


def test_disk_full_keeps_the_previous_checkpoint_and_resume_works(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = files._write
    saves = []

    def full_disk(path, f, data):
        if path.name == "last.safetensors":
            saves.append(path)
            if len(saves) == 2:  # the second epoch's checkpoint: half written, then ENOSPC
                f.write(bytes(data[:1000]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, f, data)

    monkeypatch.setattr(files, "_write", full_disk)
    with pytest.raises(UserError, match=r"last\.safetensors: cannot write \(No space left"):
        loop.train(cfg_at(run, "epochs=2"), progress=False, **DATA)
    assert not list(run.glob(".*.tmp"))  # the half-written temp file is gone
    _, meta = load_checkpoint(run / "last.safetensors")  # epoch 1's, intact
    assert (meta.training.epoch, meta.training.step) == (1, 0)
    monkeypatch.undo()  # space freed
    result = loop.train(cfg_at(run, "epochs=2"), resume=True, progress=False, **DATA)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_corrupt_checkpoint_is_caught_and_resume_falls_back_to_previous(tmp_path):
    run = tmp_path / "run"
    loop.train(cfg_at(run, "epochs=2"), progress=False, **DATA)
    last = run / "last.safetensors"
    raw = bytearray(last.read_bytes())
    raw[-1000:] = bytes(1000)  # the measurement: zeroed tail, header intact
    last.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"last\.safetensors: tensor data does not match"):
        checkpoint.load_model(last)
    assert main(["predict", str(last), str(tmp_path)]) == 2
    with pytest.warns(UserWarning, match=r"does not match.*resuming from .*previous"):
        result = loop.train(cfg_at(run, "epochs=2"), resume=True, progress=False, **DATA)
    assert result.history[-1]["epoch"] == 2  # epoch 2 redone from epoch 1's checkpoint
    assert (run / "last.safetensors.damaged").is_file()
    load_checkpoint(run / "last.safetensors")


def test_old_checkpoints_without_a_checksum_load_with_a_note(tmp_path):
    from safetensors.torch import save

    run = tmp_path / "run"
    loop.train(cfg_at(run, "epochs=1"), progress=False, **DATA)
    raw = (run / "best.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + n])["__metadata__"]
    del metadata["googlenet-sha256"]
    old = tmp_path / "old.safetensors"
    old.write_bytes(save(load_checkpoint_flat(raw), metadata=metadata))
    with pytest.warns(UserWarning, match=r"old\.safetensors: written by an older version"):
        checkpoint.load_model(old)


def load_checkpoint_flat(raw: bytes) -> dict:
    from safetensors.torch import load

    return load(raw)


def test_resume_never_unpickles(tmp_path):
    sentinel = tmp_path / "pwned"
    run = tmp_path / "run"
    loop.train(cfg_at(run, "epochs=1"), progress=False, **DATA)
    for name in ("last.safetensors", "previous.safetensors"):  # both candidates booby-trapped
        (run / name).write_bytes(trap_bytes(sentinel))
    with pytest.raises(UserError, match=r"last\.safetensors: not a readable googlenet checkpoint"):
        loop.train(cfg_at(run, "epochs=2"), resume=True, progress=False, **DATA)
    assert not sentinel.exists()


def test_init_never_unpickles(tmp_path):
    """--init with a torch.save'd .pth (a pickle) or trap bytes renamed .safetensors."""
    sentinel = tmp_path / "pwned"
    pth = tmp_path / "weights.pth"
    torch.save({"conv1.conv.weight": torch.zeros(1), "evil": Trap(sentinel)}, pth)
    renamed = tmp_path / "init.safetensors"
    renamed.write_bytes(trap_bytes(sentinel))
    for init in (pth, renamed):
        with pytest.raises(UserError, match=init.name):
            loop.train(cfg_at(tmp_path / f"run-{init.stem}", "epochs=1", f"init={init}"),
                         progress=False, **DATA)  # fmt: skip
    assert not sentinel.exists()


def test_run_folders_are_never_silently_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = loop.train(cfg_at(None, "epochs=1"), progress=False, **DATA)
    second = loop.train(cfg_at(None, "epochs=1"), progress=False, **DATA)
    assert (first.out, second.out) == (Path("runs/cifar10-fast"), Path("runs/cifar10-fast-2"))
    assert "run folder: runs/cifar10-fast-2" in capsys.readouterr().err
    kept = (first.out / "best.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        loop.train(cfg_at(first.out, "epochs=1"), progress=False, **DATA)
    assert (first.out / "best.safetensors").read_bytes() == kept
    # a live process's lock refuses a second run; a dead one's is taken over
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": sleeper.pid, "host": __import__("socket").gethostname()}
        (first.out / ".lock").write_text(json.dumps(owner))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid}"):
            loop.train(cfg_at(first.out, "epochs=1"), resume=True, progress=False, **DATA)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="took over"):
        loop.train(cfg_at(first.out, "epochs=1"), overwrite=True, progress=False, **DATA)
    assert not (first.out / ".lock").exists()


def _png(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    noise = np.random.default_rng(seed).integers(-30, 30, (16, 16, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


def test_sigterm_on_a_unicode_folder_then_resume_predict_export(tmp_path, capsys, monkeypatch):
    root = tmp_path / "mes données ü"
    classes = {"chat noir": (20, 20, 20), "ñandú": (230, 200, 40), "日本 猫": (40, 90, 220)}
    for split, n in (("train", 8), ("val", 3)):
        for c, colour in classes.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _png(root / split / c / f"é {i}.png", colour, hash((split, c, i)) % 1000)
    out = tmp_path / "runs ü" / "folder run"
    sets = [a for s in [*TINY, "dataset=folder", "epochs=2"] for a in ("--set", s)]
    signal_at(monkeypatch, "step-begin 0 1", signal.SIGTERM)
    assert main(["train", "--quiet", "--data", str(root), "--out", str(out), *sets]) == 143
    err = capsys.readouterr().err
    command = err.split("Resume with: ")[1].strip().splitlines()[0]
    assert shlex.split(command)[:5] == ["googlenet", "train", "--resume", "--out", str(out)]
    monkeypatch.undo()
    assert main([*shlex.split(command)[1:], "--quiet"]) == 0
    _, meta = load_checkpoint(out / "best.safetensors")
    assert sorted(meta.classes) == sorted(classes)
    assert main(["predict", str(out), str(root / "val"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 9 and all(r["label"] in classes for r in rows)
    assert {Path(r["source"]).parent.name for r in rows} == set(classes)
    assert main(["export", str(out), "--format", "torchscript"]) == 0
    assert (out / "best.torchscript.pt").stat().st_size > 1e6
