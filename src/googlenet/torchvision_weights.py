"""Import torchvision's ImageNet GoogLeNet weights (googlenet-1378be20.pth, downloaded by the
user or by weights.fetch) into a googlenet checkpoint: the `bn` variant, transform_input=True,
1000 ImageNet class names and torchvision's preprocessing (resize 256, centre crop 224,
ImageNet mean/std).

The .pth is read with torch.load(weights_only=True), which refuses anything but tensors and
plain containers, so no code in the file runs; .safetensors files are accepted too.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from googlenet.errors import UserError

CHECKPOINT_NAME = "best.safetensors"  # so `googlenet predict OUT_DIR ...` finds it


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (index = class id)."""
    text = resources.files("googlenet").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = [line for line in text.splitlines() if line]
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a torchvision .pth (weights_only) or a .safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many kinds for a damaged file
        raise UserError(f"{p}: not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{p}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def has_aux(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("aux1.", "aux2.")) for k in state)


def convert_torchvision(path: str | Path, out_dir: str | Path) -> Path:
    """Convert torchvision's GoogLeNet weights to OUT_DIR/best.safetensors (strict load: a file
    with missing, extra or wrongly shaped keys is rejected with a message listing them)."""
    from googlenet.checkpoint import CheckpointMeta, load_state_dict_strict, save_checkpoint
    from googlenet.model import build
    from googlenet.transforms import Preprocess

    src = Path(path)
    state = read_state_dict(src)
    aux = has_aux(state)
    model_args = {"variant": "bn", "num_classes": 1000, "aux_logits": aux, "transform_input": True}
    model = build("bn", num_classes=1000, aux_logits=aux, transform_input=True)
    load_state_dict_strict(model, state, source=str(src))
    meta = CheckpointMeta(
        model=model_args,
        classes=imagenet_classes(),
        # torchvision's evaluation transform: Resize(256), CenterCrop(224), ImageNet stats.
        preprocess=Preprocess.from_cfg(model.pretrained_cfg),
        dataset="imagenet",
        provenance={
            "source": "torchvision",
            "file": src.name,
            "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        },
    )
    return save_checkpoint(Path(out_dir) / CHECKPOINT_NAME, {"model": model.state_dict()}, meta)
