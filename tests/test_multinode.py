"""Multi-node DDP as the README shows it: two torchrun agents ("nodes", one process each) meet
through a c10d rendezvous on 127.0.0.1 and train through the CLI on an image folder; the
result equals one process with the same global batch, under test_ddp.py's settings (fp32,
dropout 0, the `article` variant, which has no BatchNorm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from googlenet.checkpoint import load_checkpoint
from googlenet.model import build
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from googlenet.training.setup import model_args
from tests.conftest import DDP_OVERRIDES, ddp_data, free_port, synth, tiny_cfg

SRC = Path(__file__).resolve().parents[1] / "src"


def _write_folder(root: Path) -> None:
    """test_ddp's data as PNG files (lossless): root/train/<class>/*.png, root/val/..."""
    for split, ds in zip(("train", "val"), ddp_data(), strict=True):
        for i, (img, y) in enumerate(zip(ds.images, ds.labels.tolist(), strict=True)):
            d = root / split / ds.classes[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "data"
    _write_folder(data)
    # resize=32: the 32x32 files are used as they are (no crop, which would differ per rank)
    sets = [*DDP_OVERRIDES, "dataset=folder", "resize=32", "loader_workers=0"]
    single = tmp_path / "single"
    train(resolve_config(overrides=[*sets, f"out={single}"]), data_root=data, progress=False)

    port, out = free_port(), tmp_path / "nodes"
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    node = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
        "--local-addr=127.0.0.1",
        "-m", "googlenet", "train", "--data", str(data), "--out", str(out), "--quiet",
        *[a for s in sets for a in ("--set", s)],
    ]  # fmt: skip
    procs = [
        subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    a, meta_a = load_checkpoint(single / "last.safetensors")
    b, meta_b = load_checkpoint(out / "last.safetensors")
    assert meta_b.training.epoch == 2 and meta_b.config["batch_size"] == 16
    for k, w in a["model"].items():
        # float sums run in a different order: allow 1e-3 of the tensor's scale
        assert (b["model"][k] - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7, k
    torch.manual_seed(0)  # the engine's initial weights (seed 0): training moved them
    args = model_args(resolve_config(overrides=sets), 4)
    init = build(args.pop("variant"), **args).state_dict()
    assert any(not torch.equal(init[k], w) for k, w in b["model"].items())
    ma, mb = meta_a.training.metrics, meta_b.training.metrics
    assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
    assert mb["val_acc"] == pytest.approx(ma["val_acc"])  # 10 val images split 5 + 5
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 writes


def test_sync_bn_is_validated_and_a_no_op_on_one_process(tmp_path):
    from googlenet.errors import UserError

    with pytest.raises(UserError, match="sync_bn.*'article' has no BatchNorm"):
        resolve_config(overrides=["variant=article", "sync_bn=true"])
    runs = []
    for sync in ("false", "true"):
        cfg = tiny_cfg(tmp_path / sync, "epochs=1", f"sync_bn={sync}")
        runs.append(train(cfg, train_set=synth(16, 0), val_set=synth(8, 1), progress=False))
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
