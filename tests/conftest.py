from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from googlenet.checkpoint import CheckpointMeta, Validation, save_checkpoint
from googlenet.data import ArrayDataset
from googlenet.metrics import VAL_PREDICTIONS, write_predictions
from googlenet.model import build
from googlenet.training.config import resolve_config
from googlenet.transforms import Preprocess

# Tests run on 2 CPU cores; more threads only add contention between parallel jobs.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "torchvision_googlenet_state_dict.json"


def _cifar_dir() -> Path:
    env = os.environ.get("GOOGLENET_DATA")
    for root in ([Path(env)] if env else []) + [SHARED / "datasets"]:
        if (root / "cifar-10-batches-bin" / "test_batch.bin").is_file():
            return root
    return SHARED / "datasets"


CIFAR_ROOT = _cifar_dir()


def reference_shapes() -> dict[str, list[int]]:
    """torchvision's GoogLeNet state_dict listing (key -> shape) from ../shared/reference;
    skips the calling test when it is absent."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    return json.loads(REFERENCE.read_text())["state_dict"]


def synthetic_state(aux: bool = True) -> dict[str, torch.Tensor]:
    """A seeded state dict in torchvision's GoogLeNet format (its keys and shapes)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in reference_shapes().items():
        if not aux and key.startswith(("aux1.", "aux2.")):
            continue
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reads the real CIFAR-10 is marked `cifar`, so `-m "not cifar"` leaves it
    out (make test-fast) whether or not its author marked it."""
    for item in items:
        if "cifar_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cifar)


@pytest.fixture
def cifar_root() -> Path:
    """Folder holding the real cifar-10-batches-bin; skips the test when it is absent."""
    if not (CIFAR_ROOT / "cifar-10-batches-bin" / "test_batch.bin").is_file():
        pytest.skip("real CIFAR-10 not found (../shared/datasets or GOOGLENET_DATA)")
    return CIFAR_ROOT


@pytest.fixture(autouse=True)
def _no_run_report(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`googlenet train` in tests skips its end-of-run report (seconds per run) unless the test
    is marked run_report; the report's own tests cover it. (`train()` itself writes none.)"""
    if request.node.get_closest_marker("run_report") is None:
        import googlenet.insight.report

        monkeypatch.setattr(googlenet.insight.report, "report_after_training", lambda *a, **k: None)


# --- shared helpers (tests import these from here, never from other test modules) ---------

# The default recipe's speed-run options turned off: the settings tests written before they
# became defaults were measured with (the options themselves: test_speedrun.py).
SPEEDRUN_OFF = ["whiten_init=false", "lookahead_every=0", "norm_bias_lr_scale=1.0",
                "alternate_flip=false"]  # fmt: skip

COLOURS = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]]).float()


def synth(n: int, seed: int, side: int = 16) -> ArrayDataset:
    """A learnable task: each class is a noisy flat colour."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = COLOURS[y][:, :, None, None] + torch.randn(n, 3, side, side, generator=g) * 40
    return ArrayDataset(x.clamp(0, 255).to(torch.uint8), y, ["red", "green", "blue", "yellow"])


CLASSES = ["cat", "dog", "ship"]


def make_checkpoint(
    path: Path,
    seed: int = 0,
    classes: list[str] | None = None,
    dataset: str = "folder",
    variant: str = "cifar",
    input_size: int = 32,
    resize: int | None = None,
    validation: Validation | None = None,
) -> Path:
    """A tiny checkpoint in the training schema: a randomly initialised model, aux off."""
    classes = classes or CLASSES
    torch.manual_seed(seed)
    model = build(variant, num_classes=len(classes), aux_logits=False)
    calibrate(model, input_size)
    meta = CheckpointMeta(
        model={"variant": variant, "num_classes": len(classes), "aux_logits": False},
        classes=classes,
        # resize None: the shorter side to input_size (the whole image at the input scale)
        preprocess=Preprocess(
            input_size, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), resize or input_size
        ),
        dataset=dataset,
        provenance={"source": "test"},
        validation=validation,
    )
    return save_checkpoint(path, {"model": model.state_dict()}, meta)


def calibrate(model: torch.nn.Module, side: int) -> None:
    """Set BatchNorm running statistics from a random batch, so an untrained model's logits
    stay moderate (random init with default statistics gives saturated softmax)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, side, side))
    model.eval()


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- explain / report / serve helpers ----------------------------------------------------------


def png_bytes(seed: int, size: tuple[int, int] = (40, 52), mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(folder: Path, n_val: int = 12, tta: str = "none") -> Path:
    """A folder run as training leaves it: checkpoint, config, metrics, val predictions (under
    test-time augmentation `tta`, as its final validation recorded)."""
    validation = Validation(tta=tta) if tta != "none" else None
    make_checkpoint(folder / "best.safetensors", input_size=16, validation=validation)
    (folder / "config.toml").write_text('recipe = "test"\nvariant = "cifar"\nepochs = 2\n')
    rows = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.1 / e,
            "train_acc": 30.0 * e,
            "val_acc": 28.0 * e,
            "train_aux1_loss": 2.2 / e,
            "val_aux1_loss": 2.3 / e,
            "images_per_s": 150.0 + e,
            "epoch_s": 60.0,
            "elapsed_s": 60.0 * e,
        }
        for e in (1, 2)
    ]
    if tta != "none":
        rows[-1] |= {"val_tta_acc": 58.25, "val_tta_acc5": 100.0, "val_tta_s": 1.0}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    paths, true, pred, prob = [], [], [], []
    for i in range(n_val):
        p = folder / "val" / f"v{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
        true.append(i % 3)
        pred.append(i % 3 if i % 4 else (i + 1) % 3)  # every 4th is a mistake
        prob.append(0.5 + i / 100)
    # as training writes it for a folder run: sample index, file, class names, probability
    write_predictions(
        folder / VAL_PREDICTIONS, list(range(n_val)), paths, true, pred, prob, CLASSES
    )
    return folder


def tiny_cfg(tmp_path, *extra: str):
    """The cifar variant at 16x16 in fp32: the cheapest real network."""
    base = [
        f"out={tmp_path / 'run'}",
        "input_size=16",
        "batch_size=8",
        "lr=0.03",
        "label_smoothing=0.0",
        "precision=fp32",
        "channels_last=false",
        "warmup_min_steps=0",  # the tests' exact schedules, not the short-run guard
        *SPEEDRUN_OFF,
    ]
    return resolve_config(overrides=[*base, *extra])


# DDP tests: the article net at 32 px in fp32, one global batch per epoch, no per-rank draws.
DDP_OVERRIDES = [
    "variant=article",
    "aux_logits=false",
    "dropout=0.0",
    "input_size=32",
    "epochs=2",
    "batch_size=16",  # global: 8 per rank with 2 ranks
    "lr=0.01",
    "schedule=constant",
    "label_smoothing=0.0",
    "precision=fp32",
    "channels_last=false",
    "ema=false",
    "crop_padding=0",  # augmentation draws differ per rank: off
    "flip=false",
    "report=false",  # subprocesses: conftest cannot skip the end-of-run report there
]


def ddp_data() -> tuple[ArrayDataset, ArrayDataset]:
    # 16 training images = one global batch per epoch, so every rank's share of a step
    # together is exactly the single process's batch; 10 validation images split 5 + 5.
    return synth(16, 0, side=32), synth(10, 1, side=32)


def fake_cifar(root: Path, n_train: int = 60, n_test: int = 80) -> Path:
    """A CIFAR-10 binary layout with random images (the format, not the content, matters)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        y = rng.integers(0, 10, n, dtype=np.uint8)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return np.concatenate([y[:, None], x], 1).tobytes()

    per = n_train // 5
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(batch(per))
    (folder / "test_batch.bin").write_bytes(batch(n_test))
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()  # noqa: SIM905
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return root
