"""torchvision's own outputs cannot be computed here (no torchvision), so the checks are: the
shared key/shape listing of torchvision's state dict loads strictly into our `bn` model, and the
converted checkpoint gives the same outputs as a `bn` model loaded directly from the same
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from googlenet.checkpoint import load_model
from googlenet.cli import main
from googlenet.errors import UserError
from googlenet.model import build
from googlenet.torchvision_weights import convert_torchvision, imagenet_classes
from tests.conftest import synthetic_state


def test_imagenet_class_names():
    names = imagenet_classes()
    assert len(names) == len(set(names)) == 1000
    assert (
        names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"
    )


def test_import_pth_strict_and_outputs_match_direct_bn_model(tmp_path: Path):
    state = synthetic_state()
    pth = tmp_path / "googlenet-1378be20.pth"
    torch.save(state, pth)
    ckpt = convert_torchvision(pth, tmp_path / "tv")
    model, meta = load_model(tmp_path / "tv")
    assert ckpt.name == "best.safetensors"
    assert meta.model == {
        "variant": "bn",
        "num_classes": 1000,
        "aux_logits": True,
        "transform_input": True,
    }
    assert meta.preprocess.resize == 256 and meta.preprocess.input_size == 224
    assert meta.classes == imagenet_classes() and meta.dataset == "imagenet"
    direct = build("bn", num_classes=1000, aux_logits=True, transform_input=True)
    direct.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x), direct.eval()(x))


def test_import_safetensors_without_aux(tmp_path: Path, capsys):
    st = tmp_path / "w.safetensors"
    save_file(synthetic_state(aux=False), str(st))
    assert main(["import-torchvision", str(st), "--out", str(tmp_path / "o")]) == 0
    assert "best.safetensors" in capsys.readouterr().out
    model, meta = load_model(tmp_path / "o")
    assert meta.model["aux_logits"] is False and model.aux1 is None


def test_missing_and_extra_keys_are_listed(tmp_path: Path, capsys):
    state = synthetic_state()
    del state["conv1.conv.weight"]
    state["head.weight"] = torch.zeros(3)
    pth = tmp_path / "bad.pth"
    torch.save(state, pth)
    with pytest.raises(UserError, match=r"missing keys: conv1\.conv\.weight.*head\.weight"):
        convert_torchvision(pth, tmp_path / "o")
    assert main(["import-torchvision", str(pth), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "conv1.conv.weight" in err and "head.weight" in err
    assert not (tmp_path / "o" / "best.safetensors").exists()


def test_unreadable_and_non_weights_files_rejected(tmp_path: Path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pth"):
        convert_torchvision(junk, tmp_path / "o")
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    with pytest.raises(UserError, match="state dict"):
        convert_torchvision(lst, tmp_path / "o")
    with pytest.raises(UserError, match="no such"):
        convert_torchvision(tmp_path / "missing.pth", tmp_path / "o")
