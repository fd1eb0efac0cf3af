"""Fine-tuning: start from a checkpoint (`init`), freeze the early blocks (`freeze`), and give
the backbone a smaller learning rate than the heads (`backbone_lr_scale`, applied by
optim.make_optimizer with `is_head`).

`init` loads every tensor whose name and shape match from the weights a checkpoint serves
(the averaged ones when it has them), re-initialises the classifiers (fc and the aux fc2) when
the classes differ, and refuses any other mismatch (e.g. a checkpoint of another variant) unless
`init_partial`. The model options (variant, transform_input) and the preprocessing
(input_size, mean, std) come from the checkpoint over the recipe's; keys the user sets
(--set, a --config file) override them.

Block names are the top-level modules `googlenet summary` prints, conv1 ... inception5b.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from googlenet.checkpoint import load_checkpoint, resolve_checkpoint, served_weights
from googlenet.errors import UserError
from googlenet.model import BLOCKS, HEADS
from googlenet.transforms import Preprocess

if TYPE_CHECKING:
    from googlenet.training.config import TrainConfig

CLASSIFIERS = ("fc.", "aux1.fc2.", "aux2.fc2.")  # their outputs are the classes
# Options an init checkpoint supplies unless the user sets them: config key -> where it is.
FROM_CHECKPOINT = ("variant", "transform_input", "input_size", "mean", "std")


def is_head(name: str) -> bool:
    """Whether a parameter/buffer name belongs to a classifier head (aux1, aux2, fc)."""
    return name.split(".", 1)[0] in HEADS


# --- the initialising checkpoint ---------------------------------------------------------------


@dataclass
class InitSource:
    """A checkpoint read for `init`: its metadata and the weights it serves."""

    path: Path  # the resolved .safetensors file
    meta: Any  # its metadata (as checkpoint.load_checkpoint returns it)
    weights: str  # the tensor group used: "ema" (averaged) or "model" (raw)
    state: dict[str, Tensor]

    @property
    def model(self) -> dict[str, Any]:
        return dict(_field(self.meta, "model") or {})

    @property
    def classes(self) -> list[str]:
        return list(_field(self.meta, "classes") or [])

    def preprocess(self) -> tuple[int, list[float], list[float]]:
        """(input_size, mean, std) the checkpoint's model was validated with."""
        pp = _field(self.meta, "preprocess")
        if not isinstance(pp, Preprocess):
            pp = Preprocess.from_dict(pp, str(self.path))
        return pp.input_size, list(pp.mean), list(pp.std)


def _field(meta: Any, name: str) -> Any:
    """meta.name or meta[name]: works for the metadata object and a plain header dict."""
    return meta.get(name) if isinstance(meta, Mapping) else getattr(meta, name, None)


def read_init(path: str | Path) -> InitSource:
    """Read an `init` checkpoint (file or run folder, or a weights name such as "torchvision";
    an existing path wins); one-line UserErrors naming the file."""
    from googlenet.weights import resolve

    p = resolve(path)
    if p.is_file() and p.suffix in (".pth", ".pt", ".pkl", ".bin"):
        raise UserError(
            f"{p}: a PyTorch weights file, not a googlenet checkpoint; convert torchvision's "
            f"GoogLeNet weights first: googlenet import-torchvision {p} --out DIR, then --init DIR"
        )
    file = resolve_checkpoint(p)
    groups, meta = load_checkpoint(file)
    weights = served_weights(groups, meta)  # the one reader of what a checkpoint serves
    if weights not in groups:
        raise UserError(f"{file}: checkpoint has no {weights!r} weights")
    src = InitSource(file, meta, weights, dict(groups[weights]))
    if not isinstance(src.model.get("variant"), str):
        raise UserError(f"{file}: checkpoint metadata names no model variant")
    return src


def config_from_init(cfg: TrainConfig, src: InitSource) -> TrainConfig:
    """`cfg` with the model and preprocessing options taken from the init checkpoint, except
    the keys the user set (cfg.user_keys) and a zero input_size / empty mean, std that the
    checkpoint cannot fill."""
    size, mean, std = src.preprocess()
    given = {
        "variant": src.model["variant"],
        "transform_input": bool(src.model.get("transform_input", False)),
        "input_size": size,
        "mean": mean,
        "std": std,
    }
    keep = set(getattr(cfg, "user_keys", ()))
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if k not in keep})


@dataclass
class InitReport:
    """What `apply_init` did, tensor by tensor (state_dict names)."""

    source: str  # the checkpoint file
    weights: str  # "ema" or "model"
    loaded: list[str] = field(default_factory=list)  # copied from the checkpoint
    reinitialised: list[str] = field(default_factory=list)  # classifiers: the classes differ
    fresh: list[str] = field(default_factory=list)  # not in the checkpoint: initialised fresh
    mismatched: list[str] = field(default_factory=list)  # other shape mismatches (partial load)
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in this model
    classes_differ: bool = False

    def record(self, sha256: str) -> dict[str, Any]:
        """The compact form a run's checkpoints keep as provenance."""
        out = dataclasses.asdict(self)
        out["loaded"] = len(self.loaded)
        return {"sha256": sha256, **out}

    def lines(self) -> list[str]:
        """Human-readable summary: loaded blocks, then every tensor not loaded."""
        out = [
            f"init from {self.source} ({self.weights} weights): loaded {len(self.loaded)} "
            f"tensors ({', '.join(_blocks(self.loaded)) or 'none'})"
        ]
        why = "the classes differ" if self.classes_differ else ""
        for label, keys, reason in (
            ("re-initialised", self.reinitialised, why),
            ("initialised fresh", self.fresh, "not in the checkpoint"),
            ("initialised fresh", self.mismatched, "shape differs; init_partial"),
            ("not used", self.unused, "not in this model"),
        ):
            if keys:
                out.append(f"  {label} ({reason}): {', '.join(keys)}")
        return out


def _blocks(keys: Iterable[str]) -> list[str]:
    """Top-level module names of `keys`, in order, each once."""
    return list(dict.fromkeys(k.split(".", 1)[0] for k in keys))


def apply_init(
    model: nn.Module, src: InitSource, classes: list[str], partial: bool = False
) -> InitReport:
    """Load `src` into `model` (already built and freshly initialised) by name and shape.

    The classifiers are re-initialised (kept as built) when `classes` differ from the
    checkpoint's by name or count; tensors the checkpoint lacks keep their fresh values. Any
    other tensor whose shape differs, or that exists on one side only outside the heads, is a
    UserError listing them, unless `partial` (then they stay fresh and are reported)."""
    own = model.state_dict()
    state = src.state
    differ = list(classes) != src.classes
    report = InitReport(str(src.path), src.weights, classes_differ=differ)
    bad: list[str] = []
    load: dict[str, Tensor] = {}
    for name, t in own.items():
        theirs = state.get(name)
        if differ and name.startswith(CLASSIFIERS):
            report.reinitialised.append(name)
        elif theirs is None:
            report.fresh.append(name)
            if not is_head(name):
                bad.append(f"{name} (missing)")
        elif tuple(theirs.shape) != tuple(t.shape):
            report.mismatched.append(name)
            bad.append(f"{name} {list(theirs.shape)} vs {list(t.shape)}")
        else:
            load[name] = theirs
            report.loaded.append(name)
    report.unused = [k for k in state if k not in own]
    bad += [f"{k} (unexpected)" for k in report.unused if not is_head(k)]
    if bad and not partial:
        shown = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        raise UserError(
            f"{src.path}: {len(bad)} tensors do not fit this {_variant(model)} model "
            f"(checkpoint: variant {src.model.get('variant')!r}): {shown}; "
            "set the checkpoint's variant, or init_partial=true to load only what fits"
        )
    if not partial:
        report.fresh = [k for k in report.fresh if is_head(k)]
    with torch.no_grad():
        for name, t in load.items():
            own[name].copy_(t)
    return report


def _variant(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return repr(spec.name) if spec is not None else type(model).__name__


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- freezing -------------------------------------------------------------


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    """train() of a frozen BatchNorm: always eval, so its running statistics stay put."""
    return nn.Module.train(self, False)


def freeze(model: nn.Module, upto: str) -> list[str]:
    """Freeze every top-level block up to and including `upto` (a name `googlenet summary`
    prints): no gradients, and their BatchNorm layers stay in eval mode through any later
    model.train(). The heads (aux1, aux2, fc) stay trainable. Returns the frozen blocks."""
    names = [n for n, _ in model.named_children() if n in BLOCKS]
    if upto not in names:
        raise UserError(
            f"config key 'freeze': {upto!r} is not a block of this model; "
            f"expected one of {', '.join(names)}"
        )
    frozen = names[: names.index(upto) + 1]
    for name in frozen:
        block = getattr(model, name)
        for p in block.parameters():
            p.requires_grad_(False)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train = _eval_only.__get__(m)  # instance override, survives deepcopy
                m.eval()
    return frozen


DEGENERATE_COSINE = 0.99  # mean pairwise cosine of pooled features above which init warns


def mean_pairwise_cosine(features: Tensor) -> float:
    """The mean cosine similarity between different rows of N x D features (N >= 2)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    n = f.shape[0]
    return float(((f @ f.T).sum() - n) / (n * (n - 1)))


def check_init_features(
    model: nn.Module, train_set: Any, size: int, mean: Any, std: Any, n: int = 16
) -> None:
    """Warn when the initialised model's pooled features hardly differ between training
    images (random or broken weights: fine-tuning them rarely beats training from scratch).
    One unaugmented batch, eval mode; streamed data (no random access) is not checked."""
    import warnings

    from googlenet.data.loader import BatchLoader

    if getattr(train_set, "labels", None) is None or not hasattr(train_set, "subset"):
        return
    idx = torch.arange(min(n, len(train_set)))
    if len(idx) < 2:
        return
    pp = Preprocess(size, mean, std, size)  # as whitening samples: resized whole, no crop
    x, _ = next(iter(BatchLoader(train_set.subset(idx), len(idx), preprocess=pp)))
    was_training = model.training
    with torch.no_grad():
        pooled = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    model.train(was_training)
    cosine = mean_pairwise_cosine(pooled)
    if cosine > DEGENERATE_COSINE:
        warnings.warn(
            f"init: the checkpoint's pooled features are nearly the same for every image "
            f"(mean pairwise cosine {cosine:.4f} on {len(idx)} training images): random or "
            "broken weights?",
            stacklevel=2,
        )
