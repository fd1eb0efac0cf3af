"""Load test of `googlenet serve` on 127.0.0.1: N requests to POST /predict from C concurrent
clients, with and without request batching; prints p50/p99 latency and throughput, and checks
every answer against the model's own prediction.

usage: PYTHONPATH=src python bench/serve_load.py CKPT [--requests 200] [--clients 8]
       [--data DATA_ROOT] (CIFAR-10 test images as PNG uploads; else random 32x32 PNGs)

The server runs as its own process (`python -m googlenet serve`), the clients are threads here.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uploads(data: str | None, n: int) -> list[bytes]:
    if data:
        from googlenet.data import load_cifar

        ds = load_cifar(data, "cifar10", "test")
        arrays = [ds.images[i].permute(1, 2, 0).numpy() for i in range(n)]
    else:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def run(ckpt: str, images: list[bytes], expected: list[str], args, batch: bool) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "googlenet", "serve", ckpt, "--port", str(port)]
    cmd += ["--max-batch", "32" if batch else "1", "--batch-window-ms", str(args.window_ms)]
    env = {**os.environ, "PYTHONPATH": "src"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        clients = [httpx.Client(base_url=base, timeout=120) for _ in range(args.clients)]
        # warm-up: one request per client
        for c in clients:
            c.post("/predict", files={"file": ("w.png", images[0], "image/png")})

        def one(i: int) -> tuple[float, bool]:
            c = clients[i % args.clients]
            t = time.perf_counter()
            r = c.post("/predict", files={"file": (f"{i}.png", images[i % len(images)])})
            dt = time.perf_counter() - t
            return dt, r.status_code == 200 and r.json()["label"] == expected[i % len(images)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        lat = sorted(r[0] for r in results)
        return {
            "batching": batch,
            "ok": sum(r[1] for r in results),
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, round(0.99 * len(lat)) - 1)],
            "req_per_s": args.requests / wall,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=5.0)
    p.add_argument("--data", default=None)
    args = p.parse_args()
    from googlenet.infer.inference import load

    images = uploads(args.data, 50)
    predictor = load(args.checkpoint)
    expected = [x.label for x in predictor.predict([Image.open(io.BytesIO(b)) for b in images])]
    print(f"{args.requests} requests, {args.clients} clients, {os.cpu_count()} CPUs")
    for batch in (False, True):
        r = run(args.checkpoint, images, expected, args, batch)
        mode = f"batching (window {args.window_ms:g} ms, max 32)" if batch else "no batching"
        print(
            f"{mode:34s} ok {r['ok']}/{args.requests}  p50 {r['p50_ms']:.0f} ms  "
            f"p99 {r['p99_ms']:.0f} ms  {r['req_per_s']:.1f} req/s"
        )


if __name__ == "__main__":
    main()
