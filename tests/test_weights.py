"""Weights by name, against a local HTTP server on 127.0.0.1 (no test reaches the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from googlenet import weights
from googlenet.checkpoint import load_model
from googlenet.errors import UserError
from tests.conftest import free_port, synthetic_state


class _Server:
    """Serves `body` at any path; `truncate` sends half of it under the full Content-Length."""

    def __init__(self, body: bytes) -> None:
        self.body, self.truncate, self.requests = body, False, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                cut = len(server.body) // 2 if server.truncate else len(server.body)
                self.wfile.write(server.body[:cut])

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Server, Path]]:
    """A synthetic torchvision file served locally, the table pointed at it and its hash, and
    the hub cache in tmp_path: (server, where the file is cached)."""
    pth = tmp_path / "made.pth"
    torch.save(synthetic_state(), pth)
    body = pth.read_bytes()
    prefix = hashlib.sha256(body).hexdigest()[:8]
    server = _Server(body)
    url = f"http://127.0.0.1:{server.port}/models/googlenet-{prefix}.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(weights.WEIGHTS, "torchvision", weights.WeightsSource(url, prefix, "test"))
    yield server, tmp_path / "torch" / "hub" / "checkpoints" / f"googlenet-{prefix}.pth"
    server.httpd.shutdown()
    server.httpd.server_close()


def test_download_convert_and_cache_hit(served):
    server, cached = served
    ckpt = weights.pretrained("torchvision")
    assert server.requests == 1 and cached.is_file()
    assert ckpt.parent == cached.with_name(cached.stem + "-googlenet")
    model, meta = load_model(ckpt)
    assert meta.model["variant"] == "bn" and meta.provenance["file"] == cached.name
    assert torch.equal(model.fc.weight, synthetic_state()["fc.weight"])
    stamp = ckpt.stat().st_mtime_ns
    assert weights.pretrained("torchvision") == ckpt  # no second download, no re-conversion
    assert server.requests == 1 and ckpt.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("fault", ["hash", "truncated"])
def test_a_bad_transfer_is_refused_and_not_cached(served, monkeypatch, fault):
    server, cached = served
    if fault == "hash":
        good = weights.WEIGHTS["torchvision"]
        bad = weights.WeightsSource(good.url, "00000000", "test")
        monkeypatch.setitem(weights.WEIGHTS, "torchvision", bad)
    server.truncate = fault == "truncated"
    with pytest.raises(UserError, match="refused.*hash"):
        weights.fetch("torchvision")
    assert server.requests == 1 and list(cached.parent.iterdir()) == []


def test_offline_names_the_url_and_the_path_then_a_manual_file_works(served, monkeypatch):
    server, cached = served
    good = weights.WEIGHTS["torchvision"]
    dead = good.url.replace(good.url.split("/")[2], f"127.0.0.1:{free_port()}")
    offline = weights.WeightsSource(dead, good.hash_prefix, "test")
    monkeypatch.setitem(weights.WEIGHTS, "torchvision", offline)
    with pytest.raises(UserError) as e:
        weights.pretrained("torchvision")
    message = str(e.value)
    assert dead in message and str(cached) in message and "\n" not in message
    # A file downloaded by hand to that path is used, with no network.
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(server.body)
    assert load_model(weights.pretrained("torchvision"))[1].model["variant"] == "bn"


def test_a_manual_file_with_the_wrong_hash_is_refused(served):
    _, cached = served
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(synthetic_state(aux=False), cached)  # another file under the expected name
    with pytest.raises(UserError, match="does not match"):
        weights.pretrained("torchvision")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown weights name 'imagenet'; known: torchvision"):
        weights.source("imagenet")


def test_the_name_works_wherever_a_checkpoint_is_taken(served, tmp_path, monkeypatch, capsys):
    import googlenet
    from googlenet.cli import main
    from googlenet.training.finetune import read_init

    server, _ = served
    predictor = googlenet.load("torchvision")
    assert len(predictor.classes) == 1000 and server.requests == 1
    assert read_init("torchvision").model["variant"] == "bn"
    assert main(["import-torchvision", "--out", str(tmp_path / "tv")]) == 0  # no FILE
    assert (tmp_path / "tv" / "best.safetensors").is_file() and server.requests == 1
    hub = torch.hub.load(str(Path(__file__).parents[1]), "googlenet", source="local",
                         pretrained=True, num_classes=4)  # fmt: skip
    assert hub.num_classes == 4 and hub.training and hub.aux1.fc2.out_features == 4
    assert torch.equal(hub.conv1.conv.weight, synthetic_state()["conv1.conv.weight"])
    # An existing path wins over the name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "torchvision").mkdir()
    with pytest.raises(UserError) as e:
        googlenet.load("torchvision")
    assert str(tmp_path / "torchvision") in str(e.value) or "torchvision:" in str(e.value)
    capsys.readouterr()


def test_import_torchvision_checks_a_hub_named_file_against_its_hash(tmp_path, capsys):
    from googlenet.cli import main

    pth = tmp_path / "googlenet-00000000.pth"
    torch.save(synthetic_state(), pth)
    assert main(["import-torchvision", str(pth), "--out", str(tmp_path / "o")]) == 2
    assert "does not match the expected 00000000" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_init_torchvision_end_to_end_on_a_tiny_folder(served, tmp_path, capsys):
    from PIL import Image

    from googlenet.checkpoint import load_checkpoint
    from googlenet.cli import main
    from tests.conftest import random_image

    server, cached = served
    for split in ("train", "val"):
        for k, name in enumerate(("ant", "bee")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(random_image(40, 40, 10 * k + i)).save(
                    tmp_path / "data" / split / name / f"{i}.png"
                )
    sets = ["input_size=32", "batch_size=4", "epochs=1", "precision=fp32", "ema=false"]
    sets += ["channels_last=false", "report=false", "tta=none"]
    args = ["train", "--quiet", "--recipe", "finetune", "--init", "torchvision"]
    args += [x for s in sets for x in ("--set", s)]
    args += ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]
    assert main(args) == 0, capsys.readouterr().err
    assert server.requests == 1
    _, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta.model["variant"] == "bn" and meta.classes == ["ant", "bee"]
    converted = cached.with_name(cached.stem + "-googlenet") / "best.safetensors"
    assert meta.provenance["init"]["loaded"] > 100 and converted.is_file()


def _images(n: int = 8, side: int = 32):
    from googlenet.data import ArrayDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, torch.arange(n) % 2, ["a", "b"])


def test_mean_pairwise_cosine():
    from googlenet.training.finetune import mean_pairwise_cosine

    assert mean_pairwise_cosine(torch.ones(4, 6)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_degenerate_init_features_warn_and_diverse_ones_do_not():
    import warnings

    from googlenet.model import build
    from googlenet.training.finetune import check_init_features

    model = build("cifar", num_classes=2)
    for m in model.inception5b.modules():  # every 5b output ReLU(0 * x + 1): constant features
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.zero_()
            m.bias.data.fill_(1.0)
    model.train()
    with pytest.warns(UserWarning, match=r"nearly the same.*cosine 1\.0000 on 8 training"):
        check_init_features(model, _images(), 32, (0.5,) * 3, (0.25,) * 3)
    assert model.training  # its mode is given back

    class Diverse(torch.nn.Module):  # the normalised pixels themselves: nearly orthogonal
        def forward_features(self, x):
            return x

        def forward_head(self, x, pre_logits=False):
            return x.flatten(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_init_features(Diverse(), _images(), 32, (0.5,) * 3, (0.25,) * 3)
