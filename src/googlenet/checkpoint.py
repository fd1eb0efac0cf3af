"""Self-describing checkpoints: one .safetensors file holding every tensor (model, EMA,
optimizer, RNG state) with a JSON header (model args, config, epoch, metrics, class names,
preprocessing) in its metadata; a readable copy of that JSON is written beside it.

No pickle anywhere: loading a checkpoint never runs code. Writes are atomic (temp file,
fsync, rename), so a killed run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from googlenet.errors import UserError

FORMAT = "googlenet-checkpoint/1"
META_KEY = "googlenet"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(
    path: str | Path, groups: Mapping[str, Mapping[str, Tensor]], meta: Mapping[str, Any]
) -> Path:
    """Save tensor groups ({"model": state_dict, "ema": ..., ...}) and JSON-able `meta`."""
    path = Path(path)
    flat: dict[str, Tensor] = {}
    for group, tensors in groups.items():
        for name, t in tensors.items():
            # safetensors refuses shared or non-contiguous storage: give each tensor its own.
            flat[f"{group}/{name}"] = t.detach().to("cpu").contiguous().clone()
    header = {"format": FORMAT, **meta}
    data = st_save(flat, metadata={META_KEY: json.dumps(header)})
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=2) + "\n")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A .safetensors file, or a run folder (its best.safetensors, else last.safetensors)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise UserError(f"{p}: folder holds no best.safetensors or last.safetensors")
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint file")
    return p


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a checkpoint: (tensor groups, meta). A damaged file gives a UserError naming it."""
    p = resolve_checkpoint(path)
    raw = p.read_bytes()
    try:
        flat = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {})[META_KEY])
    except (SafetensorsError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{p}: not a readable googlenet checkpoint (truncated or corrupt: {e})"
        ) from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{p}: unknown checkpoint format {meta.get('format')!r}")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = t
    return groups, meta


def model_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """Build the (untrained) network a checkpoint describes: meta["model"] = build() args."""
    from googlenet.model import build

    args = dict(meta.get("model") or {})
    variant = args.pop("variant", None)
    if variant is None:
        raise UserError("checkpoint metadata names no model variant")
    return build(variant, **args)


def load_model(path: str | Path, weights: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Model (eval mode) and meta from a checkpoint. weights: "model", "ema" or "auto" (EMA if
    the checkpoint has one, since that is what the run validated)."""
    groups, meta = load_checkpoint(path)
    model = model_from_meta(meta)
    group = weights
    if weights == "auto":
        group = "ema" if "ema" in groups else "model"
    if group not in groups:
        raise UserError(f"{path}: checkpoint has no {group!r} weights")
    load_state_dict_strict(model, groups[group], source=str(path))
    return model.eval(), meta


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a one-line error listing missing/unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", bad)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} keys: {shown}")
        raise UserError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split optimizer.state_dict() into tensors (for safetensors) and a JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(
    opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], rest: Mapping[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, _, k = key.partition(".")
        state.setdefault(int(idx), {})[k] = t
    for idx, st in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
