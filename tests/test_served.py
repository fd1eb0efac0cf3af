"""Which weights a run serves, raw or averaged (issue 11): chosen by a rule that never looks at
the test set (the run length, or the held-out training images), recorded in the checkpoint with
its reason, and used alike by every consumer through checkpoint.served_weights."""

from __future__ import annotations

import pytest
import torch

import googlenet
from googlenet.checkpoint import load_checkpoint, load_model, model_from_meta
from googlenet.errors import UserError
from googlenet.infer.evaluate import load_members
from googlenet.training.config import resolve_config
from googlenet.training.finetune import read_init
from googlenet.training.loop import train
from googlenet.training.optim import serve_rule
from tests.conftest import synth

BASE = ["input_size=16", "batch_size=8", "lr=0.05", "precision=fp32", "channels_last=false",
        "epochs=1", "tta=none", "ema=true"]  # fmt: skip


def _train(tmp_path, *extra: str, n_train: int = 16):
    cfg = resolve_config(overrides=[f"out={tmp_path / 'run'}", *BASE, *extra])
    return train(cfg, train_set=synth(n_train, 0), val_set=synth(12, 1), progress=False)


def _logits(state: dict, meta, x: torch.Tensor) -> torch.Tensor:
    model = model_from_meta(meta)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def test_a_two_step_run_serves_the_raw_weights_and_every_consumer_uses_them(tmp_path):
    from googlenet.infer.export import export_checkpoint

    res = _train(tmp_path)  # 16 images, batch 8: 2 optimizer steps
    ckpt = res.out / "last.safetensors"
    groups, meta = load_checkpoint(ckpt)
    assert set(groups) >= {"model", "ema"}
    assert meta.validation.weights == "model"
    assert "2 optimizer steps < serve_min_steps 100" in meta.validation.weights_reason
    x = synth(5, 4).images.float() / 255
    want = _logits(groups["model"], meta, x)
    assert not torch.allclose(want, _logits(groups["ema"], meta, x))  # the choice matters

    def same(logits: torch.Tensor) -> None:
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)

    with torch.no_grad():
        same(res.model(x))  # what train() returns
        same(load_model(res.out)[0](x))  # export, report
        same(load_members([ckpt])[0].model(x))  # evaluate
        probs = googlenet.load(res.out).predict_tensor(x)  # predict, serve, explain
        torch.testing.assert_close(probs, torch.softmax(want, 1), rtol=0, atol=1e-6)
        same(_logits(read_init(ckpt).state, meta, x))  # --init
    export_checkpoint(ckpt, "torchscript", out=tmp_path / "m.pt", device="cpu")
    with torch.no_grad():
        same(torch.jit.load(str(tmp_path / "m.pt"))(x))


def test_a_long_enough_run_serves_the_average(tmp_path):
    res = _train(tmp_path, "serve_min_steps=2")
    groups, meta = load_checkpoint(res.out / "last.safetensors")
    assert meta.validation.weights == "ema"
    assert "2 optimizer steps >= serve_min_steps 2" in meta.validation.weights_reason
    x = synth(5, 4).images.float() / 255
    want = _logits(groups["ema"], meta, x)
    probs = googlenet.load(res.out).predict_tensor(x)
    torch.testing.assert_close(probs, torch.softmax(want, 1), rtol=0, atol=1e-6)


def test_holdout_comparison_serves_the_better_on_held_out_images(tmp_path):
    res = _train(tmp_path, "holdout=8", "serve_min_steps=1000", n_train=24)
    _, meta = load_checkpoint(res.out / "last.safetensors")
    row = res.metrics
    score = {g: (row[f"val_{g}_acc"], -row[f"val_{g}_loss"], g == "ema") for g in ("model", "ema")}
    assert meta.validation.weights == max(score, key=score.__getitem__)
    assert "on 8 held-out training images" in meta.validation.weights_reason
    assert meta.validation.data["dataset"] == "holdout"
    served = "ema" if meta.validation.weights == "ema" else "model"
    assert row["val_acc"] == pytest.approx(row[f"val_{served}_acc"])  # the served one reported


def test_the_rule_never_needs_the_test_set():
    cfg = resolve_config(overrides=["ema=false"])
    assert serve_rule(cfg, 10_000) == ("model", "no weight averaging")
    ema = ["ema=true"]  # the default recipe averages no weights
    assert serve_rule(resolve_config(overrides=[*ema, "serve_weights=ema"]), 1)[0] == "ema"
    assert serve_rule(resolve_config(overrides=[*ema, "serve_weights=model"]), 10**6)[0] == "model"
    assert serve_rule(resolve_config(overrides=[*ema, "holdout=100"]), 10)[0] is None
    assert serve_rule(resolve_config(overrides=ema), 99)[0] == "model"
    assert serve_rule(resolve_config(overrides=ema), 100)[0] == "ema"
    with pytest.raises(UserError, match="serve_weights"):
        resolve_config(overrides=["serve_weights=ema", "ema=false"])
    with pytest.raises(UserError, match="serve_weights.*'average'"):
        resolve_config(overrides=["serve_weights=average"])
    with pytest.raises(UserError, match="serve_min_steps"):
        resolve_config(overrides=["serve_min_steps=-1"])
