"""Test-time augmentation in training's final validation (issue 11): the input views
(none, flip, flip-shift) are one definition shared by the engine and `googlenet evaluate`,
the final validation runs with BatchNorm folded, and the checkpoint records the TTA whose
score it reports so that evaluate reproduces it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from googlenet.checkpoint import load_checkpoint
from googlenet.cli import main
from googlenet.data.build import array_batches
from googlenet.devices import make_runner
from googlenet.errors import UserError
from googlenet.infer.evaluate import evaluate, evaluate_batches
from googlenet.metrics import VAL_PREDICTIONS, read_predictions
from googlenet.model import build
from googlenet.training.config import resolve_config
from googlenet.transforms import Preprocess
from googlenet.tta import input_views, shift, tta_logits
from tests.conftest import SPEEDRUN_OFF, calibrate

PP = Preprocess(16, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), 16)


@functools.cache
def random_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build("cifar", num_classes=4, aux_logits=False)
    calibrate(model, 16)
    return model.eval()


class Symmetrised(nn.Module):
    """f(x) + f(mirror x): exactly the same logits for an image and its mirror."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x) + self.f(x.flip(-1))


def images(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


def _predictions(model: nn.Module, mode: str) -> list[tuple[int, int, int, float]]:
    x, y = images(8), torch.arange(8) % 4
    result = evaluate_batches(
        [(make_runner(model), PP)], array_batches(x, y, 3), ["a", "b", "c", "d"], mode
    )
    return result.predictions


def test_flip_on_a_flip_invariant_model_changes_nothing():
    sym = Symmetrised(random_model())
    assert _predictions(sym, "flip") == _predictions(sym, "none")  # classes and probabilities
    # ... while the same model unsymmetrised does see the mirror (the test can fail)
    plain = random_model()
    probs = [[p for *_, p in _predictions(plain, m)] for m in ("none", "flip")]
    assert probs[0] != probs[1]


def _explicit_views(x: Tensor) -> list[Tensor]:
    """flip-shift's six views written out by index: reflected borders, then mirrors."""
    h, w = x.shape[-2:]

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    def moved(dy: int, dx: int) -> Tensor:
        rows = torch.tensor([reflect(i - dy, h) for i in range(h)])
        cols = torch.tensor([reflect(j - dx, w) for j in range(w)])
        return x[..., rows, :][..., cols]

    base = [x, moved(-1, -1), moved(1, 1)]
    mirror = [v[..., torch.arange(w - 1, -1, -1)] for v in base]
    return base + mirror


@pytest.mark.parametrize("mode", ["none", "flip", "flip-shift"])
def test_tta_logits_are_the_mean_of_the_explicit_views(mode):
    model = random_model(1)
    x = PP(images(6, 1))
    views = _explicit_views(x)
    views = {"none": views[:1], "flip": [views[0], views[3]], "flip-shift": views}[mode]
    with torch.no_grad():
        expected = torch.stack([model(v) for v in views]).mean(0)
        got = tta_logits(model, x, mode)
    assert len(input_views(x, mode)) == len(views)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if mode != "none":
        assert (got - model(x)).abs().max() > 1e-3  # the views do differ


def test_shift_moves_by_one_pixel_and_reflects_the_border():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down_right = shift(x, 1, 1)
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # row -1 reflects row 1
    assert torch.equal(shift(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])


def noise_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 4) -> Path:
    """root/{train,val}/<class>/*.png of pure noise: a few steps leave predictions near
    random, so TTA changes them."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_final_validation_records_its_tta_and_evaluate_reproduces_it(tmp_path, capsys):
    root = noise_folder(tmp_path / "data")
    run = tmp_path / "run"
    settings = ["dataset=folder", "variant=cifar", "input_size=16", "epochs=2", "batch_size=6",
                "aux_logits=false", "tta=flip-shift", "lr=0.01", "loader_workers=0",
                *SPEEDRUN_OFF]  # fmt: skip
    args = ["train", "--data", str(root), "--out", str(run)]
    assert main([*args, *(a for s in settings for a in ("--set", s))]) == 0
    err = capsys.readouterr().err
    assert "tta flip-shift acc" in err  # the printed table shows both scores and the seconds
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_tta_acc" not in rows[0]  # per-epoch validation stays plain
    final = rows[-1]
    assert {"val_acc", "val_tta_acc", "val_tta_acc5", "val_tta_s"} <= set(final)
    _, meta = load_checkpoint(run / "last.safetensors")
    assert meta.validation.tta == "flip-shift" and meta.validation.fold_bn

    # evaluate RUN: the same TTA, folding, weights, images -> the same score, image for image
    result = evaluate([run / "last.safetensors"])
    assert result.tta == "flip-shift" and result.n == 12
    assert round(100 * result.top1 * result.n) == round(final["val_tta_acc"] * result.n)
    val = read_predictions(run / VAL_PREDICTIONS)
    names = result.classes
    assert [names[p] for _, _, p, _ in result.predictions] == [r["predicted"] for r in val]
    tta_probs = np.array([p for *_, p in result.predictions])
    assert np.abs(tta_probs - [float(r["probability"]) for r in val]).max() < 1e-5

    # --tta none: the plain (folded) score of the same final validation
    plain = evaluate([run / "last.safetensors"], tta="none")
    assert round(100 * plain.top1 * plain.n) == round(final["val_acc"] * plain.n)
    assert np.abs(np.array([p for *_, p in plain.predictions]) - tta_probs).max() > 1e-4
    assert main(["evaluate", str(run / "last.safetensors"), "--tta", "flip"]) == 0
    assert "tta=flip " in capsys.readouterr().out


def test_bad_tta_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="config key 'tta'.*flip-shift.*'mirror'"):
        resolve_config(overrides=["tta=mirror"])
    assert main(["train", "--set", "tta=mirror", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tta" in err
    with pytest.raises(UserError, match="unknown TTA mode 'mirror'"):
        evaluate([tmp_path / "nothing"], tta="mirror")


def test_old_spelling_is_migrated():
    assert resolve_config(overrides=["tta=flip_shift"]).tta == "flip-shift"
