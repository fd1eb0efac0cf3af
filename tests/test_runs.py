"""Run folders are never silently overwritten; one run per folder at a time (training.runs)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from googlenet.errors import UserError
from googlenet.training import runs


def _fake_run(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names or ("config.toml",):
        (folder / n).write_text("x")
    return folder


def test_next_free_numbers_only_go_up(tmp_path):
    base = tmp_path / "cifar10-fast"
    assert runs.next_free(base) == base
    base.mkdir()  # an empty folder holds no run: still free
    assert runs.next_free(base) == base
    _fake_run(base)
    assert runs.next_free(base) == tmp_path / "cifar10-fast-2"
    _fake_run(tmp_path / "cifar10-fast-5", "last.safetensors")
    _fake_run(tmp_path / "cifar10-fast-x")  # not a number: another name
    assert runs.next_free(base) == tmp_path / "cifar10-fast-6"
    assert runs.latest(base) == tmp_path / "cifar10-fast-5"
    assert runs.latest(tmp_path / "other") is None


def test_choose_refuses_an_explicit_folder_holding_a_run(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run", "best.safetensors")
    with pytest.raises(UserError, match=r"run: already holds a run.*--resume.*--overwrite"):
        runs.choose(run, "x", resume=False, overwrite=False)
    assert runs.choose(run, "x", resume=True, overwrite=False) == run
    assert runs.choose(run, "x", resume=False, overwrite=True) == run
    with pytest.raises(UserError, match="not both"):
        runs.choose(run, "x", resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        runs.choose(tmp_path / "file", "x", resume=False, overwrite=False)
    # without --out: runs/<recipe>, then -2; --resume takes the newest
    monkeypatch.chdir(tmp_path)
    first = runs.choose(None, "fast", resume=False, overwrite=False)
    assert first == runs.RUNS_ROOT / "fast"
    _fake_run(first)
    assert runs.choose(None, "fast", resume=False, overwrite=False).name == "fast-2"
    assert runs.choose(None, "fast", resume=True, overwrite=False) == first
    assert runs.choose(None, "none", resume=True, overwrite=False).name == "none"


def test_overwrite_removes_only_the_runs_files(tmp_path):
    run = _fake_run(
        tmp_path / "run",
        "config.toml",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "last.safetensors",
        "last.json",
        "best.safetensors",
        "best.onnx",
        "notes.txt",
    )
    (run / "eval-flip").mkdir()
    (run / "eval-flip" / "report.json").write_text("{}")
    gone = runs.remove_run_files(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert len(gone) == 9 and not runs.holds_run(run)


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".last.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.safetensors").write_bytes(b"whole")
    assert [p.name for p in runs.remove_stale_temp_files(tmp_path)] == [
        ".last.safetensors.abc123.tmp"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
    lock = runs.RunLock(tmp_path).acquire()
    owner = json.loads((tmp_path / ".lock").read_text())
    assert owner["pid"] == lock.owner()["pid"] and owner["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"in use by process {owner['pid']} "):
        runs.RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with runs.RunLock(tmp_path) as taken:
        assert taken.note and f"process {pid}" in taken.note
        assert taken.owner()["pid"] != pid
    (tmp_path / ".lock").write_text("not json")  # e.g. cut short by a full disk
    with runs.RunLock(tmp_path) as taken:
        assert "unreadable lock" in taken.note
    # a reused PID (alive, but started at another time) is not the owner
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": 1, "host": socket.gethostname(), "started": "-1"})
    )
    with runs.RunLock(tmp_path) as taken:  # PID 1 lives but was not started at tick -1
        assert taken.note
    # another machine's lock cannot be checked: refused
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(UserError, match="in use by process 1 on elsewhere.example"):
        runs.RunLock(tmp_path).acquire()
