from __future__ import annotations

import subprocess
import sys

from googlenet.cli import main


def test_summary_command_prints_table(capsys):
    assert main(["summary", "--variant", "article", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "inception5b" in out and "Total params: 10,334,030" in out


def test_bad_value_exits_2_with_one_line(capsys):
    assert main(["summary", "--variant", "bn", "--input-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16x16" in err and "'bn'" in err


def test_console_entry_point_runs_as_module():
    r = subprocess.run(
        [sys.executable, "-m", "googlenet", "summary", "--variant", "cifar", "--no-aux"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "GFLOPs" in r.stdout
