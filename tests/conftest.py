from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def cifar_root() -> Path:
    """Folder holding the real cifar-10-batches-bin; skips the test when it is absent."""
    if not (CIFAR_ROOT / "cifar-10-batches-bin" / "test_batch.bin").is_file():
        pytest.skip("real CIFAR-10 not found (../shared/datasets or GOOGLENET_DATA)")
    return CIFAR_ROOT
