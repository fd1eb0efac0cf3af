"""Self-describing checkpoints: one .safetensors file holding every tensor (model, EMA,
optimizer, RNG state) with a JSON header, `CheckpointMeta` (model args, classes, preprocessing,
data set, provenance, what validation used; training state apart), in its metadata; a
readable copy of that JSON is written beside it. One writer (save_checkpoint), one validating
reader (load_checkpoint / CheckpointMeta.from_header), which also reads format /1.

No pickle anywhere: loading a checkpoint never runs code. Writes are atomic (temp file,
fsync, rename), so a killed run leaves the previous checkpoint intact. safetensors has no
checksum, so a SHA-256 of the tensor data is stored in the header metadata and verified on
every load: a flipped bit on disk is an error naming the file, not silently different weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from googlenet.errors import UserError, note
from googlenet.files import atomic_write_bytes, atomic_write_text
from googlenet.transforms import Preprocess

FORMAT = "googlenet-checkpoint/2"
V1 = "googlenet-checkpoint/1"  # read with migration (see CheckpointMeta.from_header)
META_KEY = "googlenet"
WEIGHT_GROUPS = ("model", "ema")  # tensor groups that hold a whole model


@dataclass
class Validation:
    """What the run's validation ran with, so `googlenet evaluate RUN` can reproduce it."""

    weights: str = "model"  # tensor group validated and served: "model" (raw) or "ema" (averaged)
    weights_reason: str = ""  # why those weights (config serve_weights; optim.serve_rule)
    precision: str = "fp32"  # autocast it ran under: fp32 | bf16 | fp16
    batch_size: int = 0  # images per forward pass (0: not recorded)
    channels_last: bool = False  # memory format of the input batches
    data: dict[str, Any] = field(default_factory=dict)  # images: dataset, split/root, limit, seed
    tta: str = "none"  # test-time augmentation of the reported score (tta.INPUT_MODES)
    fold_bn: bool = False  # evaluated with BatchNorm folded into the convolutions (fuse.py)


@dataclass
class TrainingState:
    """Where a training run stands, kept apart from what the model is (for --resume and logs)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps done in the next epoch (a mid-epoch checkpoint), else 0
    elapsed_s: float = 0.0  # training seconds so far, over every process that ran it
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's log row
    best: dict[str, Any] = field(default_factory=dict)  # {"epoch", "val_acc"} of best.safetensors
    optim: dict[str, Any] = field(default_factory=dict)  # optimizer state that is not tensors
    average: dict[str, Any] = field(default_factory=dict)  # weight averaging: updates, polyak
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16 GradScaler state


@dataclass
class CheckpointMeta:
    """What a checkpoint is: the one definition its writer and every reader use.

    Stored as JSON in the safetensors header (and a readable copy beside the file)."""

    model: dict[str, Any]  # build() arguments: variant, num_classes, aux_logits, transform_input..
    classes: list[str]  # class names, index = label
    preprocess: Preprocess  # how images become the model input, exactly as validation used it
    dataset: str  # what it was trained on: cifar10 | cifar100 | folder | shards | imagenet
    provenance: dict[str, Any] = field(default_factory=dict)  # source: train (+ config) | ...
    validation: Validation | None = None  # None: not recorded (imported, or an old checkpoint)
    training: TrainingState | None = None  # None: not a training checkpoint (e.g. imported)

    def __post_init__(self) -> None:
        if not isinstance(self.model.get("variant"), str):
            raise UserError("checkpoint metadata: 'model' names no variant")
        self.model.setdefault("transform_input", False)

    @property
    def variant(self) -> str:
        return str(self.model["variant"])

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    @property
    def config(self) -> dict[str, Any]:
        """The training config it was made with ({} when imported)."""
        return dict(self.provenance.get("config") or {})

    def to_header(self) -> dict[str, Any]:
        """The JSON header (with the format tag)."""
        header: dict[str, Any] = {"format": FORMAT, **dataclasses.asdict(self)}
        header["preprocess"] = self.preprocess.to_dict()
        return header

    @classmethod
    def from_header(cls, header: Any, source: str = "checkpoint") -> CheckpointMeta:
        """The validating reader: a UserError naming `source` and the missing or bad field.
        Headers of format /1 are migrated (resize null meant "shorter side to input_size";
        config/epoch/metrics/best/optim/average/scaler were top-level)."""
        if not isinstance(header, dict):
            raise UserError(f"{source}: checkpoint metadata is not a JSON object")
        fmt = header.get("format")
        if fmt not in (FORMAT, V1):
            raise UserError(f"{source}: unknown checkpoint format {fmt!r} (expected {FORMAT})")
        for key in ("model", "classes", "preprocess", "dataset"):
            if key not in header:
                raise UserError(f"{source}: checkpoint metadata has no {key!r} field")
        model, classes = header["model"], header["classes"]
        if not isinstance(model, dict) or "variant" not in model or "num_classes" not in model:
            raise UserError(f"{source}: checkpoint 'model' field needs variant and num_classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{source}: checkpoint 'classes' must be a list of names")
        if len(classes) != int(model["num_classes"]):
            raise UserError(
                f"{source}: checkpoint lists {len(classes)} classes for a "
                f"{model['num_classes']}-class model"
            )
        pp = dict(header["preprocess"]) if isinstance(header["preprocess"], dict) else None
        if fmt == V1:
            return cls._from_v1(header, pp, source)
        return cls(
            model=dict(model),
            classes=list(classes),
            preprocess=Preprocess.from_dict(pp, source),
            dataset=str(header["dataset"]),
            provenance=dict(header.get("provenance") or {}),
            validation=_sub(Validation, header.get("validation"), source, "validation"),
            training=_sub(TrainingState, header.get("training"), source, "training"),
        )

    @classmethod
    def _from_v1(cls, header: dict, pp: dict | None, source: str) -> CheckpointMeta:
        if pp is not None and pp.get("resize") is None and "input_size" in pp:
            pp["resize"] = pp["input_size"]
        config = dict(header.get("config") or {})
        if config.get("source"):  # an import (torchvision) kept its provenance in "config"
            provenance, training = config, None
        else:
            provenance = {"source": "train", "config": config}
            training = TrainingState(
                epoch=int(header.get("epoch", 0)),
                metrics=dict(header.get("metrics") or {}),
                best=dict(header.get("best") or {}),
                optim=dict(header.get("optim") or {}),
                average=dict(header.get("average") or {}),
                scaler=dict(header.get("scaler") or {}),
            )
        return cls(
            model=dict(header["model"]),
            classes=list(header["classes"]),
            preprocess=Preprocess.from_dict(pp, source),
            dataset=str(header["dataset"]),
            provenance=provenance,
            training=training,
        )


def _sub(kind: type, value: Any, source: str, name: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{source}: checkpoint {name!r} must be an object")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UserError(f"{source}: checkpoint {name!r} has unknown fields {unknown}")
    return kind(**value)


SHA_KEY = "googlenet-sha256"  # safetensors metadata: SHA-256 of the tensor data (after the header)
_SHA_PLACEHOLDER = "0" * 64


def save_checkpoint(
    path: str | Path,
    groups: Mapping[str, Mapping[str, Tensor]],
    meta: CheckpointMeta,
    keep_previous: str | Path | None = None,
) -> Path:
    """The one writer: tensor groups ({"model": state_dict, "ema": ..., ...}) and `meta`,
    atomically, with the SHA-256 of the tensor data, plus a readable JSON copy of the header
    beside it. keep_previous: keep the file being replaced under that name (a fallback when the
    new one turns out damaged)."""
    if not isinstance(meta, CheckpointMeta):
        raise TypeError(f"meta must be a CheckpointMeta, got {type(meta).__name__}")
    path = Path(path)
    flat: dict[str, Tensor] = {}
    for group, tensors in groups.items():
        for name, t in tensors.items():
            # safetensors refuses shared or non-contiguous storage: give each tensor its own.
            flat[f"{group}/{name}"] = t.detach().to("cpu").contiguous().clone()
    header = meta.to_header()
    atomic_write_bytes(path, checkpoint_bytes(flat, json.dumps(header)), keep_previous)
    atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=2) + "\n")
    return path


def checkpoint_bytes(flat: Mapping[str, Tensor], meta_json: str) -> bytes | bytearray:
    """The safetensors file: tensors plus metadata {META_KEY: meta_json, SHA_KEY: sha256}."""
    data = st_save(dict(flat), metadata={META_KEY: meta_json, SHA_KEY: _SHA_PLACEHOLDER})
    n = int.from_bytes(data[:8], "little")
    # The tensor data follows the header and does not depend on it, so hash it and put the
    # digest where the placeholder is (same length: no offset moves, no second serialisation).
    digest = hashlib.sha256(memoryview(data)[8 + n :]).hexdigest()
    token = f'"{SHA_KEY}":"{_SHA_PLACEHOLDER}"'.encode()
    at = data.find(token, 8, 8 + n)
    if at < 0 or data.find(token, at + 1, 8 + n) >= 0:  # another JSON layout: serialise again
        return st_save(dict(flat), metadata={META_KEY: meta_json, SHA_KEY: digest})
    out = bytearray(data)
    out[at : at + len(token)] = f'"{SHA_KEY}":"{digest}"'.encode()
    return out


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


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], CheckpointMeta]:
    """Read a checkpoint: (tensor groups, meta). A damaged file (cut short, a corrupt header,
    tensor data that fails its SHA-256) gives a UserError naming it."""
    p = resolve_checkpoint(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from e
    bad = f"{p}: not a readable googlenet checkpoint"
    if len(raw) < 8:
        raise UserError(f"{bad} ({len(raw)} bytes: truncated, or not a safetensors file)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise UserError(
            f"{bad} (header of {n} bytes in a {len(raw)}-byte file: truncated or corrupt)"
        )
    try:
        layout = json.loads(raw[8 : 8 + n])
        metadata = layout.get("__metadata__") or {}
        if META_KEY not in metadata:
            raise UserError(
                f"{p}: a safetensors file without googlenet metadata (not a checkpoint)"
            )
        header = json.loads(metadata[META_KEY])
        need = max(
            (int(v["data_offsets"][1]) for k, v in layout.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # JSON, layout
        raise UserError(f"{bad} (corrupt header: {type(e).__name__}: {e})") from e
    if len(raw) - 8 - n < need:
        raise UserError(f"{bad} (truncated: {len(raw) - 8 - n} of {need} bytes of tensor data)")
    want = metadata.get(SHA_KEY)
    if want is None:
        note(f"{p}: written by an older version without a checksum; its data is not verified")
    elif hashlib.sha256(memoryview(raw)[8 + n :]).hexdigest() != want:
        raise UserError(
            f"{p}: tensor data does not match the checkpoint's SHA-256 (the file was damaged "
            "on disk or in transfer)"
        )
    try:
        flat = st_load(raw)
    except (SafetensorsError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{bad} (truncated or corrupt: {e})") from e
    meta = CheckpointMeta.from_header(header, str(p))
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = t
    return groups, meta


@contextlib.contextmanager
def bad_metadata(path: str | Path) -> Iterator[None]:
    """Metadata with the wrong types (a damaged or foreign header) as a UserError naming the
    checkpoint, instead of whatever TypeError the code reading it meets."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(
            f"{path}: checkpoint metadata not understood ({type(e).__name__}: {e})"
        ) from e


def model_from_meta(meta: CheckpointMeta) -> nn.Module:
    """Build the (untrained) network a checkpoint describes."""
    from googlenet.model import build

    args = dict(meta.model)
    variant = args.pop("variant")
    return build(variant, **args)


def served_weights(groups: Mapping[str, Any], meta: CheckpointMeta, weights: str = "auto") -> str:
    """The one place that says which tensor group a checkpoint serves (googlenet.load,
    evaluate, predict, export, serve, explain and --init all come here): `weights` ("model" or
    "ema"), or with "auto" the one the run recorded as served (Validation.weights, chosen by
    optim.serve_rule), else (imported or old checkpoints) the averaged weights when present."""
    if weights == "auto":
        if meta.validation is not None:
            weights = meta.validation.weights
        else:
            weights = "ema" if "ema" in groups else "model"
    if weights not in WEIGHT_GROUPS:
        raise UserError(f"weights must be auto, model or ema, got {weights!r}")
    return weights


def load_model(path: str | Path, weights: str = "auto") -> tuple[nn.Module, CheckpointMeta]:
    """Model (eval mode) and meta from a checkpoint; weights as in served_weights."""
    groups, meta = load_checkpoint(path)
    with bad_metadata(path):
        model = model_from_meta(meta)
    group = served_weights(groups, meta, weights)
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
    # load_state_dict would cast silently; integer data in a float weight is not a model
    kind = [
        k
        for k in own
        if k in state and own[k].dtype.is_floating_point != state[k].dtype.is_floating_point
    ]
    if missing or extra or bad or kind:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", extra),
            ("wrong shape", bad),
            ("wrong dtype", kind),
        ):
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
    # Stored tensors come back contiguous; a channels_last parameter's momentum must come back
    # in its layout: torch's fused CPU SGD walks both as flat memory (a mismatch updated the
    # wrong elements after a resume, silently).
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
