"""Checkpoints and config files written by earlier versions still load.

tests/fixtures/v1_last.safetensors.gz is `last.safetensors` of a 1-step run of the `cifar`
variant (2 classes) made with the code as of commit e2b2b92 (format googlenet-checkpoint/1):
header and tensor names, shapes and dtypes exactly as written; the tensor values were then
set to zero so that the file compresses to ~100 KB. v1_config.toml is that run's config.toml.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from googlenet.checkpoint import (
    CheckpointMeta,
    TrainingState,
    Validation,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from googlenet.errors import Note, UserError
from googlenet.infer.inference import load
from googlenet.model import build
from googlenet.training.config import resolve_config
from googlenet.transforms import CIFAR10_MEAN, CIFAR10_STD, Preprocess

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
    assert model.num_classes == 2 and meta.classes == ["cat", "dog"]
    # zero weights: every image gets the same logits, and the predictor still runs end to end
    predictor = load(v1_checkpoint)
    preds = predictor.predict(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert preds[0].label in ("cat", "dog") and preds[0].prob == pytest.approx(0.5)


def test_v1_config_toml_loads_with_notes():
    with pytest.warns(Note, match="'optimizer' was removed"):
        cfg = resolve_config(config_file=FIXTURES / "v1_config.toml")
    assert cfg.epochs == 1 and cfg.batch_size == 8 and cfg.variant == "cifar"


def test_v1_preprocess_and_training_state_are_migrated(v1_checkpoint):
    _, meta = load_checkpoint(v1_checkpoint)
    # v1 wrote resize null for "shorter side to input_size"
    assert meta.preprocess == Preprocess(32, CIFAR10_MEAN, CIFAR10_STD, 32)
    assert meta.model["transform_input"] is False  # v1 left it out
    assert meta.training is not None and meta.training.epoch == 1 and meta.training.optim
    assert meta.config["optimizer"] == "sgd" and meta.provenance["source"] == "train"
    assert meta.validation is None  # not recorded by v1: load_model serves the EMA weights


def test_meta_round_trip_and_the_writer_takes_only_the_type(tmp_path):
    meta = CheckpointMeta(
        model={"variant": "cifar", "num_classes": 2, "aux_logits": False},
        classes=["a", "b"],
        preprocess=Preprocess(32, (0.5,) * 3, (0.25,) * 3, 36),
        dataset="folder",
        provenance={"source": "test"},
        validation=Validation("model", "bf16", 64, True, {"dataset": "folder", "limit": 0}),
        training=TrainingState(epoch=3, best={"epoch": 2, "val_acc": 50.0}),
    )
    model = build("cifar", num_classes=2, aux_logits=False)
    path = save_checkpoint(tmp_path / "c.safetensors", {"model": model.state_dict()}, meta)
    groups, back = load_checkpoint(path)
    assert back == meta and back.model["transform_input"] is False
    assert json.loads((tmp_path / "c.json").read_text())["format"] == "googlenet-checkpoint/2"
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "d.safetensors", groups, meta.to_header())  # type: ignore


@pytest.mark.parametrize("field", ["model", "classes", "preprocess", "dataset"])
def test_foreign_header_names_the_missing_field(tmp_path, field):
    header = {
        "format": "googlenet-checkpoint/2",
        "model": {"variant": "cifar", "num_classes": 2},
        "classes": ["a", "b"],
        "preprocess": {"input_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "resize": 32},
        "dataset": "folder",
    }
    del header[field]
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(
        st_save({"model/w": torch.zeros(1)}, metadata={"googlenet": json.dumps(header)})
    )
    with pytest.raises(
        UserError, match=f"foreign.safetensors: checkpoint metadata has no '{field}'"
    ):
        load_checkpoint(path)


def test_other_safetensors_and_bad_fields_are_one_line_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(st_save({"w": torch.zeros(1)}))
    with pytest.raises(UserError, match="plain.safetensors: a safetensors file without googlenet"):
        load_checkpoint(plain)
    header = {"format": "googlenet-checkpoint/2", "model": {"variant": "cifar", "num_classes": 3},
              "classes": ["a", "b"], "preprocess": {}, "dataset": "x"}  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save({"w": torch.zeros(1)}, metadata={"googlenet": json.dumps(header)}))
    with pytest.raises(UserError, match="lists 2 classes for a 3-class model"):
        load_checkpoint(bad)
    header["format"] = "something/9"
    bad.write_bytes(st_save({"w": torch.zeros(1)}, metadata={"googlenet": json.dumps(header)}))
    with pytest.raises(UserError, match="unknown checkpoint format 'something/9'"):
        load_checkpoint(bad)
