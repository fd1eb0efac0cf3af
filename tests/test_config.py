from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch

from googlenet.cli import main
from googlenet.errors import Note, UserError
from googlenet.model import build
from googlenet.training.config import (
    RANGES,
    TrainConfig,
    from_dict,
    list_recipes,
    parse_override,
    resolve_config,
    to_toml,
)
from googlenet.training.optim import lr_at, make_optimizer


def test_default_recipe_is_cifar10_fast():
    cfg = resolve_config()
    assert cfg.recipe == "cifar10-fast" and cfg.variant == "cifar" and cfg.input_size == 32
    assert not cfg.ema and cfg.nesterov and cfg.schedule == "onecycle" and cfg.crop_padding == 4
    assert {"article", "paper", "cifar10-fast"} <= set(list_recipes())


def test_dataclass_defaults_are_the_default_recipe():
    assert TrainConfig() == resolve_config("cifar10-fast")


def test_a_recipe_naming_a_base_changes_only_its_own_keys():
    long, fast = resolve_config("cifar10-long"), resolve_config("cifar10-fast")
    assert long.recipe == "cifar10-long" and long.epochs == 5 != fast.epochs
    differ = {k for k, v in long.to_dict().items() if fast.to_dict()[k] != v}
    assert differ == {"recipe", "epochs", "batch_size", "train_crop", "eval_every", "tta", "ema",
                      "lookahead_every"}  # fmt: skip


def test_old_config_keys_are_migrated_with_a_note(tmp_path):
    old = tmp_path / "config.toml"
    old.write_text('recipe = "cifar10-fast"\noptimizer = "sgd"\nschedule = "linear"\nepochs = 2\n')
    with pytest.warns(Note) as notes:
        cfg = resolve_config(config_file=old)
    assert cfg.schedule == "onecycle" and cfg.epochs == 2
    text = " | ".join(str(n.message) for n in notes)
    assert "'optimizer' was removed" in text and "'linear' is now called 'onecycle'" in text
    with pytest.raises(UserError, match="'optimizer' was removed"):
        resolve_config(overrides=["optimizer=sgd"])


def test_article_recipe_is_the_tutorial():
    cfg = resolve_config("article")
    assert (cfg.variant, cfg.input_size, cfg.epochs, cfg.batch_size) == ("article", 224, 25, 256)
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.01, 0.9, False, 0.0)
    assert (cfg.schedule, cfg.gamma, cfg.step_epochs, cfg.aux_weight) == ("step", 0.96, 8, 0.3)
    assert not (cfg.flip or cfg.crop_padding or cfg.scale_aspect or cfg.photometric or cfg.ema)
    assert cfg.label_smoothing == 0.0


def test_paper_recipe():
    cfg = resolve_config("paper")
    assert cfg.variant == "paper" and cfg.polyak and not cfg.ema
    assert cfg.scale_aspect and cfg.photometric and (cfg.dropout, cfg.aux_dropout) == (0.4, 0.7)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epocs=3", "unknown config key 'epocs'"),
        ("lr=abc", "config key 'lr': expected float, got 'abc'"),
        ("batch_size=2.5", "config key 'batch_size': expected int"),
        ("epochs=0", "config key 'epochs': must be > 0"),
        ("flip=1", "config key 'flip': expected bool"),
        ("schedule=sometimes", "config key 'schedule': expected one of"),
        ("variant=resnet", "unknown variant 'resnet'"),
        ("epochs=0", "config key 'epochs': must be > 0"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_config(overrides=[override])


# A value just outside each rule's range, and one on its edge that the rule accepts.
OUTSIDE = {"> 0": (0, 1), "a positive number": (0, 1), ">= 0": (-1, 0), ">= -1": (-2, -1),
           "in (0, 1]": (0, 1), "in [0, 1)": (1, 0)}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(RANGES))
def test_each_range_rule_rejects_outside_values_and_names_the_key(rule):
    base = TrainConfig()
    bad, edge = OUTSIDE[rule]
    for key in RANGES[rule]:
        kind = type(getattr(base, key))  # every ranged key is an existing int or float field
        assert kind in (int, float), key
        dataclasses.replace(base, **{key: kind(edge)}).validate()
        with pytest.raises(UserError, match=re.escape(f"config key {key!r}: must be {rule}, got")):
            dataclasses.replace(base, **{key: kind(bad)}).validate()


def test_overrides_parse_toml_scalars():
    assert parse_override("lr=1e-3") == ("lr", 0.001)
    assert parse_override("lr=1") == ("lr", 1.0)  # an int is a fine float
    assert parse_override("ema=false") == ("ema", False)
    assert parse_override("variant=paper") == ("variant", "paper")
    assert parse_override('out="runs/a b"') == ("out", "runs/a b")


def test_unknown_recipe_and_exclusive_averaging():
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        resolve_config("nope")
    with pytest.raises(UserError, match="exclusive"):
        resolve_config(overrides=["ema=true", "polyak=true"])


def test_config_file_round_trip(tmp_path):
    cfg = resolve_config("article", overrides=["epochs=3", "lr=0.05", "out=runs/x"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert resolve_config(config_file=path) == cfg
    assert from_dict(cfg.to_dict()) == cfg
    (tmp_path / "bad.toml").write_text("recipe = 'paper'\nepocs = 3\n")
    with pytest.raises(UserError, match=r"bad\.toml: unknown config key 'epocs'"):
        resolve_config(config_file=tmp_path / "bad.toml")


def test_step_schedule_matches_the_tutorial():
    cfg = resolve_config("article")
    steps = 7
    for epoch in range(25):
        want = 0.01 * math.pow(0.96, math.floor((1 + epoch) / 8))
        assert lr_at(cfg, epoch * steps + 3, steps) == pytest.approx(want, rel=1e-12)
    assert lr_at(cfg, 6 * steps, steps) == 0.01 and lr_at(cfg, 7 * steps, steps) == 0.0096


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warmup_then_decay_to_zero(schedule):
    cfg = TrainConfig(epochs=10, lr=0.4, warmup=0.2, schedule=schedule, warmup_min_steps=0)
    lrs = [lr_at(cfg, s, 10) for s in range(100)]
    peak = lrs.index(max(lrs))
    assert peak == 19 and max(lrs) == pytest.approx(0.4)
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] > 0


def test_weight_decay_skips_norm_and_bias():
    model = build("cifar", aux_logits=False)
    opt = make_optimizer(TrainConfig(weight_decay=5e-4, norm_bias_lr_scale=1.0), model)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert opt.defaults["nesterov"]


def test_cli_config_errors_exit_2_with_one_line(capsys):
    assert main(["train", "--set", "epocs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["googlenet train: error: unknown config key 'epocs'"]
    assert main(["train", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "--data=x"], "googlenet train: error: argument --set: expected one"),
        (["bogus"], "googlenet: error: argument COMMAND: invalid choice: 'bogus'"),
        (["evaluate"], "googlenet evaluate: error: the following arguments are required"),
    ],
)
def test_cli_usage_errors_are_one_line_too(capsys, argv, message):
    assert main(argv) == 2  # returned, not a SystemExit from inside argparse
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert lines[0].endswith("--help)")


def test_recipe_help_lists_every_shipped_recipe(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no name broken at a hyphen
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    line = next(
        s for s in capsys.readouterr().out.splitlines() if s.lstrip().startswith("--recipe")
    )
    assert list_recipes() and all(name in line for name in list_recipes()), line


def test_min_area_reaches_the_scale_aspect_crop():
    from googlenet.data.augment import scale_aspect_boxes
    from googlenet.training.setup import augment_of

    assert augment_of(TrainConfig()).min_area == 0.08  # the paper's, as before the key
    aug = augment_of(resolve_config(overrides=["scale_aspect=true", "min_area=0.5"]))
    assert aug.scale_aspect and aug.min_area == 0.5
    g = torch.Generator().manual_seed(0)
    _, _, w, h = scale_aspect_boxes(256, 32, 32, aug.min_area, g)
    assert float((w * h).min()) >= 0.5 * 32 * 32 * 0.9  # integer boxes round a little
