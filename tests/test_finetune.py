"""Fine-tuning: --init from a checkpoint, freeze, backbone_lr_scale, the finetune recipe."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from googlenet.checkpoint import load_checkpoint
from googlenet.cli import main
from googlenet.data import ArrayDataset
from googlenet.errors import Note, UserError
from googlenet.model import build
from googlenet.torchvision_weights import convert_torchvision
from googlenet.training.config import resolve_config, to_toml
from googlenet.training.finetune import apply_init, config_from_init, freeze, read_init
from googlenet.training.loop import train
from googlenet.training.optim import make_optimizer
from googlenet.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import make_checkpoint, random_image

FIVE = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
CLASSIFIER_KEYS = [
    "aux1.fc2.weight",
    "aux1.fc2.bias",
    "aux2.fc2.weight",
    "aux2.fc2.bias",
    "fc.weight",
    "fc.bias",
]


def five_classes(n: int, seed: int, side: int = 32) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    x = (y * 50)[:, None, None, None] + torch.randint(0, 40, (n, 3, side, side), generator=g)
    return ArrayDataset(x.to(torch.uint8), y, list(FIVE))


@pytest.fixture(scope="module")
def imported_bn(tmp_path_factory) -> Path:
    """A checkpoint made by `import-torchvision`: bn, 1000 ImageNet classes, aux heads,
    transform_input, resize 256 / crop 224 (random weights standing in for the real ones)."""
    folder = tmp_path_factory.mktemp("tv")
    torch.manual_seed(1)
    net = build("bn", num_classes=1000, aux_logits=True, transform_input=True)
    for m in net.modules():  # non-default BN statistics, so "loaded" is visible in buffers too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_file(net.state_dict(), str(folder / "googlenet.safetensors"))
    return convert_torchvision(folder / "googlenet.safetensors", folder / "imagenet")


def small(tmp_path: Path, *extra: str):
    """Cheap settings: 32x32 input (overriding the checkpoint's 224), fp32, one short epoch."""
    base = [
        f"out={tmp_path / 'run'}",
        "input_size=32",
        "batch_size=8",
        "epochs=1",
        "precision=fp32",
        "channels_last=false",
        "ema=false",
        "schedule=constant",
        "lr=0.05",
    ]
    return resolve_config("finetune", overrides=[*base, *extra])


def test_init_from_imported_bn_into_five_classes(tmp_path, imported_bn):
    """One run covers loading, re-initialising, freeze and backbone_lr_scale (bn is slow)."""
    init = f"init={str(imported_bn)!r}"
    cfg = small(tmp_path, init, "freeze=inception4e", "backbone_lr_scale=0.1")
    with pytest.warns(Note) as notes:
        result = train(cfg, train_set=five_classes(16, 0), val_set=five_classes(10, 1))
    lines = [str(w.message) for w in notes]
    n = len(result.model.state_dict()) - len(CLASSIFIER_KEYS)  # everything but the classifiers
    assert lines[0].startswith(f"init from {imported_bn} (model weights): loaded {n} tensors")
    assert "conv1, conv2, conv3, inception3a" in lines[0]
    assert lines[1] == "  re-initialised (the classes differ): " + ", ".join(CLASSIFIER_KEYS)
    _, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    # the model options come from the checkpoint: bn, and torchvision's input conversion
    assert meta.model["variant"] == "bn" and meta.model["transform_input"] is True
    assert meta.classes == FIVE and meta.model["num_classes"] == 5
    pp = meta.preprocess
    assert pp.input_size == 32  # the config key overrides the checkpoint's 224
    assert pp.mean == pytest.approx(IMAGENET_MEAN) and pp.std == pytest.approx(IMAGENET_STD)
    init = meta.provenance["init"]
    assert init["loaded"] == n and init["reinitialised"] == CLASSIFIER_KEYS
    assert init["fresh"] == [] and init["mismatched"] == [] and len(init["sha256"]) == 64
    assert 'init = "' in (tmp_path / "run" / "config.toml").read_text()

    # frozen blocks (conv1..inception4e) are untouched, BN statistics included; the rest moved
    before, _ = load_checkpoint(imported_bn)
    after = result.model.state_dict()
    frozen = ("conv1.", "conv2.", "conv3.", "inception3", "inception4")
    for k, v in after.items():
        if k.startswith(frozen):
            assert torch.equal(v, before["model"][k]), k
    for k in ("inception5b.branch1.conv.weight", "inception5b.branch1.bn.running_mean",
              "aux1.fc1.weight", "aux1.conv.conv.weight"):  # fmt: skip
        assert not torch.equal(after[k], before["model"][k]), k
    assert after["fc.weight"].shape == (5, 1024)
    # the scheduled lr (constant 0.05) reaches the backbone scaled by backbone_lr_scale
    lrs = {
        (g.get("lr_scale", 1.0), g["weight_decay"] > 0): g["lr"]
        for g in meta.training.optim["param_groups"]
    }
    assert lrs == {
        (0.1, True): pytest.approx(0.005),
        (0.1, False): pytest.approx(0.005),
        (1.0, True): 0.05,
        (1.0, False): 0.05,
    }


def test_frozen_parameters_are_left_out_and_heads_get_the_full_rate():
    cfg = resolve_config(overrides=["backbone_lr_scale=0.5", "norm_bias_lr_scale=1.0"])
    net = build("cifar", num_classes=5)
    freeze(net, "conv3")
    groups = make_optimizer(cfg, net).param_groups
    in_opt = {id(p) for g in groups for p in g["params"]}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(in_opt) == len(trainable) and not any(
        id(p) in in_opt for p in net.conv1.parameters()
    )
    heads = {id(p) for m in (net.fc, net.aux1, net.aux2) for p in m.parameters()}
    for g in groups:
        assert all((id(p) in heads) == (g.get("lr_scale", 1.0) == 1.0) for p in g["params"])


def test_frozen_batchnorm_stays_in_eval_mode():
    net = build("cifar", num_classes=3)
    assert freeze(net, "maxpool2") == ["conv1", "maxpool1", "conv2", "conv3", "maxpool2"]
    for model in (net, copy.deepcopy(net)):  # EMA keeps a deepcopy
        model.train()
        assert not model.conv3.bn.training and not model.conv1.bn.weight.requires_grad
        assert model.inception3a.branch1.bn.training and model.fc.training
        model.eval()
        model.train()
        assert not model.conv1.bn.training
    with pytest.raises(UserError, match="'lrn1' is not a block"):
        freeze(net, "lrn1")


def test_checkpoint_options_yield_to_keys_the_user_sets(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.safetensors", input_size=40)  # cifar, 3 classes
    src = read_init(ckpt)
    cfg = config_from_init(resolve_config("finetune"), src)  # the recipe's bn/224 yield
    assert (cfg.variant, cfg.input_size, cfg.transform_input) == ("cifar", 40, False)
    assert cfg.mean == [0.5, 0.4, 0.3] and cfg.std == [0.25, 0.25, 0.25]
    cfg = config_from_init(resolve_config("finetune", overrides=["input_size=48"]), src)
    assert (cfg.variant, cfg.input_size) == ("cifar", 48)
    user = resolve_config("finetune", overrides=["mean=[0.1, 0.2, 0.3]", "variant=bn"])
    cfg = config_from_init(user, src)
    assert cfg.mean == [0.1, 0.2, 0.3] and cfg.variant == "bn" and cfg.input_size == 40


def test_keys_the_user_set_survive_the_init_checkpoint(tmp_path):
    """What the user set (user_keys) outlives config_from_init, so validate() still refuses
    whiten_init=true set by the user next to init; it is no config key and never saved."""
    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    cfg = resolve_config(overrides=["whiten_init=true", "epochs=3"])
    cfg.init = str(ckpt)  # as if given with it (resolve_config already refuses that pair)
    filled = config_from_init(cfg, read_init(ckpt))
    assert filled.user_keys == {"whiten_init", "epochs"}
    with pytest.raises(UserError, match="'init' and 'whiten_init' exclude each other"):
        filled.validate()
    assert dataclasses.replace(filled).user_keys == filled.user_keys
    assert "user_keys" not in filled.to_dict() and "user_keys" not in to_toml(filled)
    with pytest.raises(UserError, match="unknown config key 'user_keys'"):
        resolve_config(overrides=["user_keys=[]"])


def test_wrong_variant_lists_tensors_unless_partial(tmp_path, capsys, imported_bn):
    src = read_init(imported_bn)  # bn; the model below is the cifar variant
    with pytest.raises(UserError, match=r"best\.safetensors: \d+ tensors do not fit") as e:
        apply_init(build("cifar", num_classes=3), src, ["a", "b", "c"])
    assert "conv1.conv.weight [64, 3, 7, 7] vs [64, 3, 3, 3]" in str(e.value)
    report = apply_init(build("cifar", num_classes=3), src, ["a"], partial=True)
    assert "conv1.conv.weight" in report.mismatched and "conv2.conv.weight" in report.loaded
    assert "inception3a.branch3.1.conv.weight" in report.mismatched  # 3x3 vs 5x5
    # from the CLI, on an image folder: one line naming the file, exit 2, nothing trained
    for split in ("train", "val"):
        for k, name in enumerate(FIVE):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            image = random_image(32, 32, k)
            Image.fromarray(image).save(tmp_path / "data" / split / name / "0.png")
    args = ["train", "--quiet", "--init", str(imported_bn), "--set", "variant=cifar"]
    args += ["--set", "dataset=folder", "--set", "batch_size=4"]
    args += ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(imported_bn) in err and "conv1.conv.weight" in err
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_bad_init_files_give_one_line_errors_naming_the_file(tmp_path, capsys):
    good = make_checkpoint(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    plain = tmp_path / "plain.safetensors"  # safetensors, but no googlenet metadata
    save_file({"w": torch.zeros(2)}, str(plain))
    pth = tmp_path / "googlenet-1378be20.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    missing = tmp_path / "missing.safetensors"
    for bad, why in (
        (truncated, "truncated"),
        (junk, ""),
        (plain, ""),
        (pth, "import-torchvision"),
        (missing, "no such"),
    ):
        args = ["train", "--quiet", "--init", str(bad), "--out", str(tmp_path / "run")]
        assert main(args) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and why in err, err


def test_resume_restores_its_own_checkpoint_not_the_init(tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "init.safetensors", classes=["a", "b", "c", "d"], input_size=16
    )
    data = dict(train_set=five_classes(16, 0).subset(torch.arange(12)), val_set=None)
    data["val_set"] = data["train_set"]
    data["train_set"].classes = ["a", "b", "c", "d", "e"]
    cfg = small(tmp_path, f"init={str(ckpt)!r}", "aux_logits=false", "input_size=16")
    with pytest.warns(Note, match="re-initialised"):
        train(cfg, **data)
    ckpt.unlink()  # a resume must not need it
    saved = tmp_path / "run" / "config.toml"
    again = resolve_config(config_file=saved, overrides=["epochs=2"])
    assert again.init == str(ckpt) and again.variant == "cifar"
    result = train(again, resume=True, **data)
    assert result.epochs == 2 and len(result.history) == 2
    _, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta.provenance["init"]["reinitialised"] == ["fc.weight", "fc.bias"]
    fresh = dataclasses.replace(again, out=str(tmp_path / "fresh"))  # (a held run is refused)
    with pytest.raises(UserError, match="init.safetensors"):  # a fresh start applies init
        train(fresh, **data)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("freeze=inception9z", "unknown block 'inception9z'"),
        ("mean=[0.5, 0.5]", "'mean': expected 3 finite values"),
        ("std=[0.2, 0.0, 0.2]", "'std': expected 3 finite values > 0"),
        ("backbone_lr_scale=0", "'backbone_lr_scale': must be a positive number"),
        ("mean=0.5", "expected a list of numbers"),
        ("init=x.safetensors;whiten_init=true", "'init' and 'whiten_init' exclude each other"),
    ],
)
def test_finetune_config_keys_are_checked(setting, message):
    with pytest.raises(UserError, match=message):
        resolve_config("finetune", overrides=setting.split(";"))
