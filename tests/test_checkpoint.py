"""Checkpoints and config files written by earlier versions still load.

tests/fixtures/v1_last.safetensors.gz is `last.safetensors` of a 1-step run of the `cifar`
variant (2 classes) made with the code as of commit e2b2b92 (format googlenet-checkpoint/1):
header and tensor names, shapes and dtypes exactly as written; the tensor values were then
set to zero so that the file compresses to ~100 KB. v1_config.toml is that run's config.toml.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from googlenet.checkpoint import load_checkpoint, load_model
from googlenet.config import resolve_config
from googlenet.errors import Note
from googlenet.inference import load

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def v1_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "last.safetensors"
    path.write_bytes(gzip.decompress((FIXTURES / "v1_last.safetensors.gz").read_bytes()))
    return path


def test_v1_checkpoint_loads(v1_checkpoint):
    groups, meta = load_checkpoint(v1_checkpoint)
    assert set(groups) == {"model", "ema", "optim", "rng"}
    model, meta = load_model(v1_checkpoint)
    assert model.num_classes == 2 and meta["classes"] == ["cat", "dog"]
    # zero weights: every image gets the same logits, and the predictor still runs end to end
    predictor = load(v1_checkpoint)
    preds = predictor.predict(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert preds[0].label in ("cat", "dog") and preds[0].prob == pytest.approx(0.5)


def test_v1_config_toml_loads_with_notes():
    with pytest.warns(Note, match="'optimizer' was removed"):
        cfg = resolve_config(config_file=FIXTURES / "v1_config.toml")
    assert cfg.epochs == 1 and cfg.batch_size == 8 and cfg.variant == "cifar"
