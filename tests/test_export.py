from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from googlenet.cli import main
from googlenet.errors import UserError
from googlenet.infer.export import export_checkpoint, export_model, onnx_runner, verify
from googlenet.model import build
from tests.conftest import calibrate, make_checkpoint


def test_onnx_round_trip_cifar_checkpoint(tmp_path: Path):
    import onnx

    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    report = export_checkpoint(ckpt, "onnx")
    assert report.path == tmp_path / "c.onnx" and report.path.is_file()
    assert set(report.diffs) == {"random batch 1", "random batch 3"}
    assert 0 <= report.max_diff <= 1e-4
    # dynamic batch axis, the checkpoint's classes in the metadata
    proto = onnx.load(str(report.path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["googlenet"])
    assert meta["classes"] == ["cat", "dog", "ship"] and meta["preprocess"]["input_size"] == 32
    run = onnx_runner(report.path)
    model = build("cifar", num_classes=3, aux_logits=False)
    x = torch.randn(5, 3, 32, 32)
    assert run(x).shape == (5, 3)
    with pytest.raises(UserError, match="exceeds"):  # a different model is caught
        verify(model.eval(), run, {"random": x})


def test_torchscript_round_trip(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    out = tmp_path / "m.pt"
    report = export_checkpoint(ckpt, "torchscript", out)
    assert report.path == out and report.max_diff <= 1e-4
    extra = {"googlenet.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["googlenet.json"])["model"]["variant"] == "cifar"
    assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paper", "article", "bn"])
def test_onnx_round_trip_224_variants(tmp_path: Path, variant: str):
    torch.manual_seed(0)
    model = build(variant, num_classes=10, aux_logits=False)
    calibrate(model, 224) if variant == "bn" else model.eval()
    report = export_model(model, tmp_path / f"{variant}.onnx", "onnx", 224)
    assert report.max_diff <= 1e-4 and (tmp_path / f"{variant}.onnx").stat().st_size > 1e6


def test_missing_onnxruntime_is_a_clear_user_error(tmp_path: Path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"googlenet\[onnx\]"):
        export_checkpoint(ckpt, "onnx")
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.cifar
def test_cli_export_checks_real_cifar_images(tmp_path: Path, cifar_root: Path, capsys):
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    ckpt = make_checkpoint(tmp_path / "c.safetensors", classes=names, dataset="cifar10")
    out = tmp_path / "x.onnx"
    args = ["export", str(ckpt), "--format", "onnx", "--out", str(out), "--data", str(cifar_root)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "check real batch 8: max |logit difference|" in text and out.is_file()
