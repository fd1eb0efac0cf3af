"""Training configuration: one typed dataclass, recipes as TOML files, `--set key=value`.

A config is resolved in layers: the dataclass defaults, then a recipe (a TOML file shipped in
googlenet/training/recipes/ or any file given with --config; a file may name its base with
`recipe = "..."`), then `--set` overrides. Every key and type is checked, so a typo is a
UserError naming the key instead of a silently ignored option.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from googlenet.data.shards import check_options as check_shard_options
from googlenet.errors import UserError, note
from googlenet.model import BLOCKS, get_spec, list_variants

DEFAULT_RECIPE = "cifar10-fast"
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "cifar100", "folder", "shards"),
    "schedule": ("step", "onecycle", "cosine", "constant"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "tta": ("none", "flip", "flip-shift"),
    "serve_weights": ("auto", "ema", "model"),
}

# Numeric keys' allowed ranges: the rule's text (as the error says it) -> keys.
_RANGE_TESTS: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    "a positive number": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= -1": lambda v: v >= -1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}
RANGES: dict[str, tuple[str, ...]] = {
    "> 0": ("epochs", "batch_size", "step_epochs", "eval_every", "train_crop_stages"),
    "a positive number": ("lr", "norm_bias_lr_scale"),
    ">= 0": (
        "num_classes", "input_size", "limit_train", "limit_val", "crop_padding", "cutout",
        "weight_decay", "clip_grad", "aux_weight", "workers", "resize", "warmup_min_steps",
        "lookahead_every", "holdout", "checkpoint_every_s", "serve_min_steps",
    ),
    ">= -1": ("loader_workers",),
    "in (0, 1]": ("train_crop", "train_crop_until", "bn_momentum", "min_area"),
    "in [0, 1)": (
        "warmup", "label_smoothing", "ema_decay", "momentum", "lookahead_decay", "max_bad_images",
    ),
}  # fmt: skip

# Keys older versions wrote (config.toml, checkpoints) that are gone: why, for the note.
REMOVED_KEYS = {"optimizer": "SGD is the only optimizer"}
# Values older versions accepted that now have one name: key -> {old: new}.
RENAMED_VALUES = {"schedule": {"linear": "onecycle"}, "tta": {"flip_shift": "flip-shift"}}
# TrainConfig fields that are no config keys (not set by name, not saved).
NOT_KEYS = ("user_keys",)


@dataclass
class TrainConfig:
    """Every training option. The defaults are the default recipe, cifar10-fast."""

    recipe: str = DEFAULT_RECIPE  # the recipe this config started from (informational)
    # --- model ---
    variant: str = "cifar"  # model variant: paper | article | bn | cifar
    num_classes: int = 0  # 0: the number of classes in the training data
    aux_logits: bool = True  # train with the two auxiliary heads
    aux_weight: float = 0.3  # loss = main + aux_weight * (aux1 + aux2), as in the paper
    dropout: float = -1.0  # dropout before the classifier; negative: the variant's default
    aux_dropout: float = -1.0  # dropout inside the aux heads; negative: the variant's default
    transform_input: bool = False  # torchvision's input conversion (its ImageNet weights need it)
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | cifar100 | folder (root/train, root/val) | shards
    data_root: str = ""  # empty: --data, else $GOOGLENET_DATA, else ./data
    input_size: int = 32  # training/eval side in pixels; 0: the variant's size (images resized)
    train_crop: float = 0.75  # train first on random unpadded crops of this share of input_size
    #   (no smaller than the variant takes; 1: off), then at input_size; validation: input_size
    train_crop_until: float = 0.625  # share of the run's steps on train_crop crops
    train_crop_stages: int = 2  # those steps in this many equal parts whose sides grow evenly
    #   from train_crop's toward input_size (2 at 0.75 of 32: 24 then 28, then 32)
    resize: int = 0  # folder/shards: decode to this square (shorter side, centre crop) before the
    #   augmentation and the crop to input_size; 0: 8/7 of input_size (256 for 224)
    limit_train: int = 0  # quick runs: train on N training images (0: all), a sample drawn with
    #   `seed` and stratified by class (each class keeps its share)
    limit_val: int = 0  # validate on N validation images (0: all), sampled the same way
    mean: list[float] = field(default_factory=list)  # per-channel mean (0..1); []: data set's
    std: list[float] = field(default_factory=list)  # per-channel std (0..1); []: data set's
    max_bad_images: float = 0.01  # folder data: unreadable images are skipped up to this share
    # --- augmentation (training only) ---
    crop_padding: int = 4  # random crop after zero-padding by this many pixels (0: off)
    flip: bool = True  # random horizontal flip
    cutout: int = 0  # side of a random square erased from each image (0: off)
    scale_aspect: bool = False  # paper's crop: 8%-100% of the area, aspect ratio 3/4-4/3
    # scale_aspect's smallest crop, as a fraction of the image's area (the paper's 0.08); raise
    # it for sources smaller than the input (CIFAR's 32 px at 224: 0.08 is a 9-px crop x25)
    min_area: float = 0.08
    photometric: bool = False  # paper's photometric distortions (brightness/contrast/...)
    # --- optimisation ---
    epochs: float = 1.6  # passes over the training data; a fraction ends the last pass early
    batch_size: int = 128  # global batch (split evenly over DDP ranks)
    lr: float = 0.4  # peak learning rate (step schedule: the initial one)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 weight decay on conv/linear weights
    decay_norm_bias: bool = False  # also decay BatchNorm parameters and biases
    schedule: str = "onecycle"  # step | onecycle (warmup, then linear decay) | cosine | constant
    warmup: float = 0.2  # onecycle/cosine: fraction of all steps spent warming up from ~0
    step_epochs: int = 8  # step: lr = lr * gamma ** floor((1 + epoch) / step_epochs)
    gamma: float = 0.96  # step: the factor applied every step_epochs epochs
    label_smoothing: float = 0.2  # cross-entropy label smoothing for every head
    clip_grad: float = 0.0  # clip the gradient norm to this (0: off)
    warmup_min_steps: int = (
        100  # onecycle/cosine: never climb faster than lr/N per step (short runs)
    )
    # --- speed-run tricks (airbench-style; the default recipe's settings, which other recipes
    #     turn off; ranked on a held-out slice in docs/results.md) ---
    norm_bias_lr_scale: float = 8.0  # learning-rate multiplier for BatchNorm biases
    freeze_bn_scale: bool = False  # BatchNorm scales fixed at 1 (not the fine-tuning `freeze`)
    bn_momentum: float = 0.1  # BatchNorm running-statistics momentum (torch's convention)
    lookahead_every: int = 0  # every N steps pull the weights to a slow copy (0: off)
    lookahead_decay: float = 0.77  # slow copy's decay at the end of the run, ramped as (t/T)^3
    whiten_init: bool = True  # conv1 from the whitening of training patches (skipped with init)
    alternate_flip: bool = True  # flip each image on alternate epochs instead of at random
    # --- fine-tuning (finetune.py) ---
    # start from this checkpoint, or a weights name ("torchvision"; an existing path wins);
    # fresh start only, a resume restores its own
    init: str = ""
    init_partial: bool = False  # init: load what fits, leave other mismatched tensors fresh
    freeze: str = ""  # freeze every block up to and including this one (summary's names)
    backbone_lr_scale: float = 1.0  # lr factor for every parameter outside aux1/aux2/fc
    # --- weight averaging (the averaged weights are validated and exported) ---
    ema: bool = False  # exponential moving average of the weights
    ema_decay: float = 0.99  # EMA decay per step (ramped up over the first steps)
    polyak: bool = False  # paper's Polyak averaging: the plain mean of all iterates
    serve_weights: str = "auto"  # weights the checkpoint serves (validated, loaded, exported):
    #   ema (averaged) | model (raw) | auto: with holdout > 0 whichever scores better on the
    #   held-out images at the final validation, else averaged only in runs of at least
    #   serve_min_steps optimizer steps (never chosen by the test set; optim.serve_rule)
    serve_min_steps: int = 100  # auto: fewer steps than this serve the raw weights (EMA 0.99
    #   averages over ~100 steps: a shorter run's average still holds its first iterates)
    # --- speed / hardware ---
    precision: str = "auto"  # auto (bf16 on CPUs/GPUs that have it, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True  # NHWC memory format (faster convolutions with bf16)
    fast_pool: bool = True  # bf16 channels-last CPU runs: the 3x3 max-pools (branches' 3x3/1,
    #   stages' 3x3/2) by a C kernel (fastpool.py; the same function, built with the system
    #   compiler, else ATen)
    keep_freed_memory: bool = True  # CPU runs on glibc: freed memory stays in the process
    #   instead of large blocks going back to the OS each step (devices.keep_freed_memory),
    #   up to 1.25x the resident size after the first step (devices.bound_kept_memory)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    workers: int = 0  # torch CPU threads per process (0: torch's default)
    sync_bn: bool = False  # DDP on GPUs: BatchNorm statistics over the global batch (BN variants)
    loader_workers: int = -1  # folder/shards: processes decoding batches ahead of the step;
    #   -1: this rank's share of the CPU cores less one (at most 16), 0: threads in this process
    # --- run ---
    seed: int = 0  # seeds the weights, data order, augmentation and dropout
    eval_every: int = 2  # validate every N epochs (and always after the last)
    holdout: int = 0  # validate on N training images held out (a seeded, stratified sample)
    #   instead of val/test
    checkpoint_every_s: float = 300.0  # also save last.safetensors mid-epoch every N s (0: off)
    tta: str = "flip"  # the final validation's test-time augmentation, with BatchNorm folded:
    #   none | flip (the image and its mirror) | flip-shift (those and 1-pixel diagonal shifts,
    #   6 views; tta.input_views); logits averaged. Per-epoch validation stays plain.
    report: bool = True  # googlenet train: write RUN/report.html at the end from the recorded
    #   validation (~seconds)
    out: str = ""  # run folder; empty: runs/<recipe>

    # Keys the user set (--set, a --config file) rather than a recipe or the defaults; set by
    # resolve_config. They win over what an `init` checkpoint supplies. A field, so that
    # dataclasses.replace keeps it, but no config key: never set by name, saved or compared.
    user_keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def validate(self) -> TrainConfig:
        """Check values (types are checked when they are set); return self."""
        self._check_values()
        self._check_model_keys()
        self._check_run_keys()
        return self

    def _check_values(self) -> None:
        """Names from a list, finite floats, numbers in their ranges."""
        if self.variant not in list_variants():
            raise UserError(
                f"config key 'variant': unknown variant {self.variant!r}; "
                f"expected one of {', '.join(list_variants())}"
            )
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise UserError(
                    f"config key {key!r}: expected one of {', '.join(options)}, "
                    f"got {getattr(self, key)!r}"
                )
        for f in fields(self):  # inf/nan in any float key is a typo or an overflow
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"config key {f.name!r}: must be a finite number, got {value}")
        for rule, keys in RANGES.items():
            for key in keys:
                if not _RANGE_TESTS[rule](getattr(self, key)):
                    raise UserError(f"config key {key!r}: must be {rule}, got {getattr(self, key)}")

    def _check_model_keys(self) -> None:
        """The model, its input and its initialisation: values that fit one another."""
        if self.sync_bn and not get_spec(self.variant).batch_norm:
            raise UserError(
                f"config key 'sync_bn': variant {self.variant!r} has no BatchNorm to sync"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            ok = all(math.isfinite(v) and (key == "mean" or v > 0) for v in values)
            if len(values) not in (0, 3) or not ok:
                raise UserError(
                    f"config key {key!r}: expected 3 finite values"
                    f"{' > 0' if key == 'std' else ''} (or [] for the data set's), got {values}"
                )
        if not (math.isfinite(self.backbone_lr_scale) and self.backbone_lr_scale > 0):
            raise UserError(
                f"config key 'backbone_lr_scale': must be a positive number, "
                f"got {self.backbone_lr_scale} (freeze blocks with 'freeze' instead)"
            )
        if self.init and self.whiten_init and "whiten_init" in self.user_keys:
            raise UserError(
                "config keys 'init' and 'whiten_init' exclude each other "
                "(whitening would replace conv1's loaded weights)"
            )
        if self.freeze and self.freeze not in BLOCKS:
            raise UserError(
                f"config key 'freeze': unknown block {self.freeze!r}; expected one of "
                f"{', '.join(BLOCKS)} (the names googlenet summary prints)"
            )

    def _check_run_keys(self) -> None:
        """Dropout, the seed, the recipe name and the weight averaging."""
        for key in ("dropout", "aux_dropout"):  # negative: the variant's default
            if getattr(self, key) >= 1:
                raise UserError(
                    f"config key {key!r}: must be in [0, 1) (or negative for the variant's "
                    f"default), got {getattr(self, key)}"
                )
        if not 0 <= self.seed < 2**63:
            raise UserError(f"config key 'seed': must be in [0, 2**63), got {self.seed}")
        if not RECIPE_NAME.fullmatch(self.recipe):
            raise UserError(
                f"config key 'recipe': {self.recipe!r} is not a recipe name (letters, digits, "
                "'.', '_', '-'); it names the default run folder runs/<recipe>"
            )
        if self.ema and self.polyak:
            raise UserError("config keys 'ema' and 'polyak' are exclusive; set one to false")
        if self.serve_weights == "ema" and not (self.ema or self.polyak):
            raise UserError(
                "config key 'serve_weights': 'ema' needs weight averaging (ema or polyak = true)"
            )
        check_shard_options(self.dataset, self.holdout, self.limit_train, self.limit_val)

    def to_dict(self) -> dict[str, Any]:
        """The config keys and their values (what config.toml and checkpoints hold)."""
        values = dataclasses.asdict(self)
        for key in NOT_KEYS:
            del values[key]
        return values


FIELD_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool, "list[float]": list}[str(f.type)]
    for f in fields(TrainConfig)
    if f.name not in NOT_KEYS
}


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the field's type (an int is a fine float)."""
    if key not in FIELD_TYPES:
        raise UserError(f"unknown config key {key!r}")
    want = FIELD_TYPES[key]
    if want is list:  # list[float]
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise UserError(f"config key {key!r}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise UserError(f"config key {key!r}: expected {want.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as a TOML scalar (bare words are strings)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected key=value")
    if key in REMOVED_KEYS:
        raise UserError(f"config key {key!r} was removed ({REMOVED_KEYS[key]})")
    if key not in FIELD_TYPES:
        raise UserError(f"unknown config key {key!r}")
    if FIELD_TYPES[key] is str and not raw.startswith(('"', "'")):
        return key, migrate({key: raw}, "--set")[key]  # e.g. --set variant=paper
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # not a TOML scalar: a string, which _coerce rejects for non-str keys
    return key, _coerce(key, value)


def list_recipes() -> list[str]:
    """Names of the recipes shipped in googlenet/training/recipes/."""
    folder = resources.files("googlenet.training") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML ({e})") from e
    for key, value in data.items():
        if isinstance(value, dict):
            raise UserError(f"{source}: config key {key!r}: tables are not supported")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e


def recipe_values(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The key/values of a shipped recipe; one naming a base (`recipe = "..."`) gets the
    base's values with its own on top, so a variation of a recipe states only what differs."""
    path = resources.files("googlenet.training") / "recipes" / f"{name}.toml"
    if name not in list_recipes() or not path.is_file():
        raise UserError(f"unknown recipe {name!r}; expected one of {', '.join(list_recipes())}")
    values = _read_toml(path.read_text(encoding="utf-8"), f"recipe {name!r}")
    base = values.pop("recipe", None)
    if base is None:
        return values
    if base == name or base in _seen:
        raise UserError(f"recipe {name!r}: base recipes form a cycle ({' -> '.join(_seen)})")
    return {**recipe_values(str(base), (*_seen, name)), **values}


def migrate(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Values written by an older version, with removed keys dropped and renamed values
    replaced; each change is reported as a note naming `source`."""
    out = {}
    for key, value in values.items():
        if key in REMOVED_KEYS:
            note(f"{source}: config key {key!r} was removed ({REMOVED_KEYS[key]}); ignored")
            continue
        new = RENAMED_VALUES.get(key, {}).get(value) if isinstance(value, str) else None
        if new is not None:
            note(f"{source}: config key {key!r}: {value!r} is now called {new!r}")
            value = new
        out[key] = value
    return out


def _apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> None:
    for key, value in migrate(values, source).items():
        try:
            setattr(cfg, key, _coerce(key, value))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None


def resolve_config(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Defaults <- recipe (default cifar10-fast) or --config file <- --set overrides."""
    if recipe is not None and config_file is not None:
        raise UserError("give either --recipe or --config, not both")
    cfg = TrainConfig()
    user: set[str] = set()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        values = _read_toml(_read_text(path), str(path))
        base = values.get("recipe", DEFAULT_RECIPE)
        if not isinstance(base, str):
            raise UserError(f"{path}: config key 'recipe': expected str, got {base!r}")
        if base not in list_recipes():
            raise UserError(
                f"{path}: config key 'recipe': unknown base recipe {base!r}; expected one of "
                f"{', '.join(list_recipes())}"
            )
        _apply(cfg, recipe_values(base), f"recipe {base!r}")  # the file changes a few keys
        _apply(cfg, values, str(path))
        user.update(k for k in values if k != "recipe")
    else:
        name = recipe or DEFAULT_RECIPE
        _apply(cfg, recipe_values(name), f"recipe {name!r}")
        cfg.recipe = name
    for text in overrides:
        key, value = parse_override(text)
        setattr(cfg, key, value)
        user.add(key)
    cfg.user_keys = frozenset(user)
    return cfg.validate()


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML (flat scalars), readable back with --config."""
    lines = ["# googlenet training config (resolved); rerun with: googlenet train --config FILE"]
    for key, value in cfg.to_dict().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A config from to_dict() output (e.g. a checkpoint's meta["config"])."""
    cfg = TrainConfig()
    _apply(cfg, values, "config")
    return cfg.validate()
