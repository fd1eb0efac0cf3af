from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from googlenet.cli import main
from googlenet.infer.inference import load
from tests.conftest import free_port, make_checkpoint, png_bytes

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's test client) is not installed")
from fastapi.testclient import TestClient

from googlenet.serve import create_app


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "best.safetensors")


@pytest.fixture(scope="module")
def client(ckpt: Path):
    app = create_app(load(ckpt), max_bytes=200_000)
    with TestClient(app) as c:
        yield c


def test_predict_equals_cli_predict_json(client: TestClient, ckpt: Path, tmp_path: Path, capsys):
    files = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "P"]):
        p = tmp_path / f"im{i}.png"
        p.write_bytes(png_bytes(i, mode=mode))
        files.append(p)
    assert main(["predict", str(ckpt), *map(str, files), "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(cli) == len(files)
    for path, want in zip(files, cli, strict=True):
        r = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        got = r.json()
        assert set(got) == set(want)
        assert got["source"] == path.name
        assert got["label"] == want["label"] and got["index"] == want["index"]
        assert abs(got["prob"] - want["prob"]) <= 1e-4
        assert [t["label"] for t in got["topk"]] == [t["label"] for t in want["topk"]]
        for a, b in zip(got["topk"], want["topk"], strict=True):
            assert abs(a["prob"] - b["prob"]) <= 1e-4


def test_health_page_and_explain(client: TestClient):
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text
    r = client.post("/explain", files={"file": ("a.png", png_bytes(7), "image/png")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["prediction"]["label"] in ("cat", "dog", "ship")
    assert doc["gradcam"].startswith("data:image/png;base64,")
    assert len(doc["branch_usage"]) == 9
    for shares in doc["branch_usage"].values():
        assert set(shares) == {"1x1", "3x3", "5x5", "pool"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (the decoder refuses it from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10_000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("notes.txt", b"this is not an image at all", 415),
        ("empty.png", b"", 400),
        ("cut.png", png_bytes(1)[:60], 400),
        ("huge.png", b"\x89PNG" + b"0" * 300_000, 413),  # refused by Content-Length
        ("big.png", b"\x89PNG" + b"0" * 220_000, 413),  # refused after reading
        ("bomb.png", png_header(10_000, 10_000), 400),  # over transforms.MAX_PIXELS
        ("strip.png", png_header(5_050, 50), 400),  # beyond MAX_ASPECT, as files are
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(
    client: TestClient, name: str, data: bytes, status: int
):
    r = client.post("/predict", files={"file": (name, data, "image/png")})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]
    ok = client.post("/predict", files={"file": ("ok.png", png_bytes(3), "image/png")})
    assert ok.status_code == 200 and client.get("/health").status_code == 200


def test_requests_without_a_file_field_get_400_json(client: TestClient):
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = client.post("/predict", content=b"raw", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_load_on_a_real_server_batches_concurrent_requests(ckpt: Path):
    """40 requests from 8 concurrent clients over real HTTP: all answered correctly, and the
    server ran fewer forward passes than requests (bench/serve_load.py measures latency)."""
    import httpx
    import uvicorn

    predictor = load(ckpt)
    app = create_app(predictor, batch_window_ms=20, max_batch=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        images = [png_bytes(i) for i in range(8)]
        expected = [p.label for p in predictor.predict([Image.open(io.BytesIO(b)) for b in images])]

        def one(i: int) -> str:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                files = {"file": (f"{i}.png", images[i % 8], "image/png")}
                r = c.post("/predict", files=files)
                r.raise_for_status()
                return r.json()["label"]

        with ThreadPoolExecutor(8) as pool:
            labels = list(pool.map(one, range(40)))
        assert labels == [expected[i % 8] for i in range(40)]
        batcher = app.state.batcher
        assert batcher.items == 40 and batcher.batches < 40
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_cli_serve_without_extras_is_a_clear_error(ckpt: Path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name == "fastapi" or name.startswith("fastapi."):
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", str(ckpt)]) == 2
    assert "pip install 'googlenet[serve]'" in capsys.readouterr().err
