"""DDP with 2 gloo processes on CPU gives the result of one process with the same global batch.

Batch norm normalises each rank's half-batch with its own statistics, so a BN network trained
data-parallel is a (slightly) different computation. The `article` variant has no batch norm;
with dropout 0 and fp32 the averaged per-rank gradients equal the full-batch gradient, and the
weights after two SGD steps agree up to float summation order.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from googlenet.checkpoint import load_checkpoint
from googlenet.metrics import VAL_PREDICTIONS, read_predictions
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from tests.conftest import DDP_OVERRIDES, ddp_data, free_port


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    train_set, val_set = ddp_data()
    cfg = resolve_config(overrides=[*DDP_OVERRIDES, f"out={out}"])
    train(cfg, train_set=train_set, val_set=val_set, progress=False)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train_set, val_set = ddp_data()
    single = train(
        resolve_config(overrides=[*DDP_OVERRIDES, f"out={tmp_path / 'single'}"]),
        train_set=train_set,
        val_set=val_set,
        progress=False,
    )
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)

    a, meta_a = load_checkpoint(tmp_path / "single" / "last.safetensors")
    b, meta_b = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    assert meta_b.training.epoch == 2 and meta_b.config["batch_size"] == 16
    for k, w in a["model"].items():
        # float sums run in a different order: allow 1e-3 of the tensor's scale
        assert (b["model"][k] - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7, k
    # the weights moved in epoch 2, so agreeing after it is not trivial
    one = train(
        resolve_config(overrides=[*DDP_OVERRIDES, "epochs=1", f"out={tmp_path / 'one'}"]),
        train_set=train_set,
        val_set=val_set,
        progress=False,
    )
    assert any(not torch.equal(one.model.state_dict()[k], w) for k, w in a["model"].items())
    assert all(torch.equal(single.model.state_dict()[k], w) for k, w in a["model"].items())
    # metrics reduced over both ranks: the same train loss, every val image counted once
    ma, mb = meta_a.training.metrics, meta_b.training.metrics
    assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
    assert mb["val_acc"] == pytest.approx(ma["val_acc"]) and mb["val_loss"] == pytest.approx(
        ma["val_loss"], rel=1e-4
    )
    # only rank 0 writes: one row per epoch
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    # val_predictions.csv gathers both ranks' images, in data-set order
    single_rows = read_predictions(tmp_path / "single" / VAL_PREDICTIONS)
    ddp_rows = read_predictions(tmp_path / "ddp" / VAL_PREDICTIONS)
    assert [r["index"] for r in ddp_rows] == [str(i) for i in range(len(val_set))]
    assert [r["true"] for r in ddp_rows] == [r["true"] for r in single_rows]
