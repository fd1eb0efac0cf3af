"""Peak resident memory and wall time of whole training processes, keep_freed_memory on/off.

    python bench/bench_memory.py [--pairs 3] [--recipe article] [--set key=value ...]

Runs `googlenet train` as child processes, alternating `keep_freed_memory=true` and `false`
(the order flips every pair so drift in the machine's speed falls on both), on the real
CIFAR-10 (../shared/datasets or $GOOGLENET_DATA). Reports each child's peak RSS (from
wait4's rusage, which counts the whole process) and wall time, then the medians. The default
is the Keras tutorial's setting cut to two steps: `--recipe article --set epochs=1
--set limit_train=512 --set limit_val=256` (batch 256 at 224x224).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets"


def run_once(recipe: str, sets: list[str], keep: bool, data: str, out: Path) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of one training process."""
    cmd = [sys.executable, "-m", "googlenet", "train", "--recipe", recipe, "--data", data,
           "--out", str(out), "--quiet", "--set", f"keep_freed_memory={str(keep).lower()}",
           "--set", "report=false"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1e6, wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--recipe", default="article")
    ap.add_argument("--set", dest="sets", action="append", default=None)
    ap.add_argument("--data", default=os.environ.get("GOOGLENET_DATA") or str(DEFAULT_DATA))
    args = ap.parse_args()
    sets = args.sets or ["epochs=1", "limit_train=512", "limit_val=256"]
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for keep in (True, False) if i % 2 == 0 else (False, True):
                rss, wall = run_once(args.recipe, sets, keep, args.data, Path(tmp) / f"{i}-{keep}")
                results[keep].append((rss, wall))
                print(f"pair {i + 1} keep_freed_memory={keep!s:5}: peak RSS {rss:5.2f} GB, "
                      f"{wall:6.1f} s", flush=True)  # fmt: skip
    print(f"\n{args.recipe} {' '.join(sets)}, {args.pairs} runs each")
    for keep, rows in results.items():
        rss = [r for r, _ in rows]
        wall = statistics.median(w for _, w in rows)
        print(f"keep_freed_memory={keep!s:5}: peak RSS {min(rss):.2f}-{max(rss):.2f} GB "
              f"(median {statistics.median(rss):.2f}), median wall {wall:.1f} s")  # fmt: skip
    ratio = statistics.median(w for _, w in results[True]) / statistics.median(
        w for _, w in results[False]
    )
    print(f"wall time with / without: {ratio:.3f}x")


if __name__ == "__main__":
    main()
