"""The speed-run options (issue 11): each one validated, effective, and working end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from googlenet.checkpoint import load_checkpoint
from googlenet.data import ArrayDataset
from googlenet.data.augment import Augment
from googlenet.data.loader import BatchLoader
from googlenet.errors import UserError
from googlenet.model import build
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from googlenet.training.optim import lr_at
from googlenet.training.speedrun import Lookahead, whiten_conv1
from googlenet.transforms import Preprocess
from tests.conftest import synth


def tiny(tmp_path, *extra: str):
    base = [
        f"out={tmp_path / 'run'}",
        "input_size=16",
        "batch_size=8",
        "lr=0.03",
        "precision=fp32",
        "channels_last=false",
        "epochs=2",
        "warmup_min_steps=0",
    ]
    return resolve_config(overrides=[*base, *extra])


def run(tmp_path, *extra: str):
    cfg = tiny(tmp_path, *extra)
    return cfg, train(cfg, train_set=synth(48, 0), val_set=synth(16, 1), progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        "bn_momentum=0.0",
        "bn_momentum=1.5",
        "norm_bias_lr_scale=0.0",
        "norm_bias_lr_scale=-2.0",
        "lookahead_decay=1.0",
        "lookahead_every=-1",
        "holdout=-5",
        "train_crop=0.0",
        "train_crop_until=1.5",
        "train_crop_stages=0",
        "warmup_min_steps=-1",
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, bad):
    with pytest.raises(UserError, match=bad.split("=")[0]):
        tiny(tmp_path, bad).validate()


def test_short_runs_warm_up_over_at_least_warmup_min_steps():
    cfg = resolve_config(overrides=["epochs=1", "lr=0.4", "warmup=0.2", "warmup_min_steps=100"])
    lrs = [lr_at(cfg, s, 8) for s in range(8)]  # an 8-step run: the peak is never reached
    assert all(0 <= lr <= 0.4 * (s + 1) / 100 + 1e-12 for s, lr in enumerate(lrs))
    assert lrs[0] == pytest.approx(0.004) and lrs[-1] == 0.0  # still decays to 0
    # A long run is unaffected: warm-up (20% of 600 steps) is longer than 100 steps.
    long = resolve_config(overrides=["epochs=3", "lr=0.4", "warmup=0.2", "warmup_min_steps=100"])
    free = resolve_config(overrides=["epochs=3", "lr=0.4", "warmup=0.2", "warmup_min_steps=0"])
    assert [lr_at(long, s, 200) for s in range(600)] == [lr_at(free, s, 200) for s in range(600)]


def test_frozen_bn_scales_stay_one_and_bn_momentum_is_set(tmp_path):
    _, res = run(tmp_path, "freeze_bn_scale=true", "bn_momentum=0.4", "ema=false")
    norms = [m for m in res.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(m.momentum == 0.4 for m in norms)
    # the shifts did train
    assert any(m.bias.abs().max() > 0 for m in norms)


def test_norm_bias_group_gets_scaled_lr(tmp_path):
    cfg = tiny(tmp_path, "norm_bias_lr_scale=64")
    from googlenet.training.optim import make_optimizer, set_lr

    model = build("cifar", num_classes=4)
    opt = make_optimizer(cfg, model)
    set_lr(opt, 0.01)
    scaled = [g for g in opt.param_groups if g.get("lr_scale") == 64]
    assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(0.64)
    n_bias = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(scaled[0]["params"]) == n_bias
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups if g not in scaled)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # and it trains end to end
    _, res = run(tmp_path / "e2e", "norm_bias_lr_scale=64", "lr=0.01")
    assert res.metrics["val_acc"] >= 0 and torch.isfinite(torch.tensor(res.metrics["val_loss"]))


def test_fused_sgd_steps_like_the_per_tensor_loop(tmp_path):
    from googlenet.training.optim import make_optimizer, set_lr

    cfg = tiny(tmp_path, "norm_bias_lr_scale=8", "weight_decay=0.01")
    torch.manual_seed(0)
    a = build("cifar", num_classes=4)
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    fused, loop = make_optimizer(cfg, a), make_optimizer(cfg, b)
    assert fused.defaults["fused"] and len(fused.param_groups) == 3  # decay, no decay, BN bias
    for g in loop.param_groups:
        g["fused"], g["foreach"] = False, False
    for step in range(3):
        for opt, net in ((fused, a), (loop, b)):
            set_lr(opt, 0.1 * (step + 1))
            torch.manual_seed(step)  # the same gradients for both
            for p in net.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), "fused SGD left the reference update"
    moved = zip(a.parameters(), start.parameters(), strict=True)
    assert all(not torch.equal(p, q) for p, q in moved)


def test_restored_momentum_keeps_the_channels_last_layout_fused_sgd_needs(tmp_path):
    from googlenet.checkpoint import optimizer_state_from_tensors, optimizer_state_to_tensors
    from googlenet.training.optim import make_optimizer

    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    net = build("cifar", num_classes=4).to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, net)

    def step(o: torch.optim.Optimizer, n: nn.Module, seed: int) -> None:
        torch.manual_seed(seed)
        for p in n.parameters():
            p.grad = torch.randn_like(p)
        o.step()

    step(opt, net, 0)
    tensors, rest = optimizer_state_to_tensors(opt)
    # copies in the layout a file gives back
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    net2 = copy.deepcopy(net)
    opt2 = make_optimizer(cfg, net2)
    optimizer_state_from_tensors(opt2, tensors, rest)
    w = net2.conv3.conv.weight
    assert opt2.state[w]["momentum_buffer"].stride() == w.stride()
    step(opt, net, 1)
    step(opt2, net2, 1)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)  # the resumed step is the uninterrupted one


def test_lookahead_pulls_to_the_slow_copy_and_ends_on_it():
    net = nn.Linear(3, 1)
    la = Lookahead(net, every=2, decay=0.5, total_steps=4)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    la.step(net, 0)  # not a sync step: unchanged
    assert torch.equal(net.weight, start + 1)
    la.step(net, 1)  # sync at t/T = 0.5: decay 0.5 * 0.125
    d = 0.5 * 0.5**3
    assert torch.allclose(net.weight, start + (1 - d))
    assert torch.equal(la.slow["weight"], net.weight.detach())


def test_lookahead_runs_end_to_end_and_is_checkpointed(tmp_path):
    _, res = run(tmp_path, "lookahead_every=2", "ema=false")
    groups, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert "lookahead" in groups
    # the last step synchronises: the model holds the slow weights
    slow, model = groups["lookahead"], groups["model"]
    floats = {k for k, v in model.items() if v.dtype.is_floating_point}
    assert slow.keys() == floats
    assert all(torch.equal(slow[k], model[k]) for k in floats)
    assert res.metrics["val_acc"] >= 0


def test_whitening_makes_conv1_responses_decorrelated():
    g = torch.Generator().manual_seed(0)
    # correlated channels: a shared component plus noise
    base = torch.randn(64, 1, 12, 12, generator=g)
    x = torch.cat([base + 0.3 * torch.randn(64, 1, 12, 12, generator=g) for _ in range(3)], 1)
    model = build("cifar", num_classes=4)
    n = whiten_conv1(model, x, eps=1e-6)
    assert n == 54  # 27-dim 3x3x3 patches, + and - copies, 64 filters available
    w = model.conv1.conv.weight[:27].reshape(27, -1)
    patches = nn.functional.unfold(x, 3).transpose(1, 2).reshape(-1, 27)
    patches = patches - patches.mean(0)
    resp = patches @ w.T
    cov = resp.T @ resp / resp.shape[0]
    assert torch.allclose(cov, torch.eye(27), atol=2e-2)
    assert torch.equal(model.conv1.conv.weight[27:54], -model.conv1.conv.weight[:27])


def test_whiten_init_trains_end_to_end(tmp_path):
    _, res = run(tmp_path / "whitened", "whiten_init=true")
    _, plain = run(tmp_path / "plain", "whiten_init=false")
    losses = [row["train_loss"] for row in res.history]
    assert torch.isfinite(torch.tensor(losses)).all()
    assert losses[-1] < losses[0]  # it learns from the whitened start
    assert losses[0] != plain.history[0]["train_loss"]  # which is not the plain start


def test_alternate_flip_flips_each_image_once_in_two_epochs():
    data = synth(40, 0, side=8)
    # make every image left-right asymmetric so a flip is visible
    data.images[:, :, :, 0] = 0
    data.images[:, :, :, -1] = 255
    loader = BatchLoader(
        data, 10, preprocess=Preprocess(8, (0, 0, 0), (1, 1, 1)), seed=3, shuffle=True,
        augment=Augment(flip=True, alternate_flip=True),
    )  # fmt: skip
    flipped = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = {}
        for (x, _), idx in zip(loader, loader.indices().split(10), strict=True):
            for i, img in zip(idx.tolist(), x, strict=True):
                seen[i] = bool(img[:, :, 0].mean() > img[:, :, -1].mean())
        flipped.append(seen)
    assert flipped[0].keys() == flipped[1].keys() == set(range(40))
    assert all(flipped[0][i] != flipped[1][i] for i in range(40))
    assert 5 < sum(flipped[0].values()) < 35  # a random phase, not all the same


def test_holdout_validates_on_training_images(tmp_path):
    from googlenet.data import hold_out

    data = synth(48, 0)
    rest, held = hold_out(data, 16, seed=0)
    assert len(rest) == 32 and len(held) == 16
    both = torch.cat([rest.images, held.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == 48  # disjoint, and together all of it
    share = data.labels.bincount(minlength=10).double() * 16 / 48  # stratified: every class
    assert ((held.labels.bincount(minlength=10) - share).abs() < 1).all()  # gets its share
    _, res = run(tmp_path, "holdout=16")
    assert 0 <= res.metrics["val_acc"] <= 100
    with pytest.raises(UserError, match="holdout"):
        train(tiny(tmp_path / "x", "holdout=48"), train_set=synth(48, 0), val_set=synth(8, 1),
              progress=False)  # fmt: skip


@pytest.mark.parametrize("variant", ["cifar", "bn"])
def test_folded_batchnorm_equals_unfolded_eval(variant):
    from googlenet.fuse import fold_batchnorm
    from tests.conftest import calibrate

    torch.manual_seed(0)
    side = 32 if variant == "cifar" else 64
    model = build(variant, num_classes=5, aux_logits=False)
    for m in model.modules():  # non-trivial affine parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    calibrate(model, side)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(4, 3, side, side)
    with torch.no_grad():
        a, b = model.eval()(x), folded(x)
    # evaluation equal: probabilities within 1e-5, logits to fp32 rounding of a deep network
    assert (a.softmax(1) - b.softmax(1)).abs().max() <= 1e-5
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_evaluate_replays_a_holdout_run_on_its_held_out_images(tmp_path):
    """A run validated on held-out training images is re-evaluated on those images (rebuilt
    from the recorded root and seed), not silently on the test split."""
    from googlenet.infer.evaluate import evaluate
    from tests.conftest import fake_cifar

    data = fake_cifar(tmp_path / "data", n_train=100, n_test=30)
    cfg = tiny(tmp_path, "holdout=20", "epochs=1", "tta=none")
    res = train(cfg, data_root=data, progress=False)
    meta = load_checkpoint(res.out / "last.safetensors")[1]
    assert meta.validation.data["dataset"] == "holdout"
    again = evaluate([res.out / "last.safetensors"])
    assert again.n == 20  # the held-out images; the test split has 30
    assert again.top1 * 100 == pytest.approx(res.metrics["val_acc"], abs=1e-6)
    assert evaluate([res.out / "last.safetensors"], data=data).n == 30  # --data: test split
    # held out from arrays handed to train(): nothing to rebuild them from
    _, given = run(tmp_path / "given", "holdout=16")
    with pytest.raises(UserError, match="held-out"):
        evaluate([given.out / "last.safetensors"])


@pytest.mark.parametrize("until", [1.0, 0.75])
def test_train_crop_trains_on_smaller_crops_and_validates_at_input_size(
    tmp_path, monkeypatch, until
):
    seen: list[tuple[bool, int]] = []
    forward = type(build("cifar", num_classes=4)).forward

    def spy(self, x):
        seen.append((self.training, x.shape[-1]))
        return forward(self, x)

    monkeypatch.setattr(type(build("cifar", num_classes=4)), "forward", spy)
    # 48 images, batch 8: 6 steps a pass, 12 in all; 9 of them (0.75) at 16 when until=0.75
    _, res = run(tmp_path, "input_size=20", "train_crop=0.8", f"train_crop_until={until}",
                 "train_crop_stages=1")  # fmt: skip
    trained = [s for t, s in seen if t]
    small = round(until * 12)
    assert trained == [16] * small + [20] * (12 - small)  # smaller crops first, in order
    assert {s for t, s in seen if not t} == {20}  # validation: the whole 20x20 image
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")[1].preprocess.input_size == 20
    assert res.history[-1]["val_acc"] >= 0
    seen.clear()  # two stages: 9 steps split 4 + 5 (round half to even), sides 16 then 18
    run(tmp_path / "s", "input_size=20", "train_crop=0.8", "train_crop_until=0.75",
        "train_crop_stages=2")  # fmt: skip
    assert [s for t, s in seen if t] == [16] * 4 + [18] * 5 + [20] * 3
    seen.clear()  # crops below the variant's smallest input: none
    run(tmp_path / "b", "train_crop=0.5", "epochs=1")  # 8: below the cifar variant's 16
    assert {s for t, s in seen} == {16}


def test_fractional_epochs_end_the_last_pass_early_with_the_schedule(tmp_path, monkeypatch):
    import googlenet.training.loop as loop

    lrs: list[float] = []
    set_lr = loop.set_lr
    monkeypatch.setattr(loop, "set_lr", lambda opt, lr: (lrs.append(lr), set_lr(opt, lr)))
    built: list[int] = []  # training batches the loader built (validation passes no augment)
    transform = BatchLoader.transform
    monkeypatch.setattr(
        BatchLoader,
        "transform",
        lambda self, x, *a: (
            built.append(len(x)) if self.augment is not None else None,
            transform(self, x, *a),
        )[1],
    )
    _, res = run(tmp_path, "epochs=1.5", "warmup=0.5")  # 48 images, batch 8: 6 steps a pass
    assert len(lrs) == 9  # 6 + 3
    assert len(built) == 9  # the cut-short pass builds no batch it does not train on
    assert max(lrs) == pytest.approx(0.03) and lrs[-1] == 0.0  # one-cycle over the 9 steps
    assert [r["epoch"] for r in res.history] == [1, 2] and "val_acc" in res.history[-1]
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")[1].training.epoch == 2


def test_train_crop_crops_skip_the_padding_and_switch_at_the_given_step():
    data = ArrayDataset(torch.full((40, 3, 8, 8), 255, dtype=torch.uint8), torch.zeros(40))
    loader = BatchLoader(
        data, 10, preprocess=Preprocess(8, (0, 0, 0), (1, 1, 1)), seed=3, shuffle=True,
        augment=Augment(crop_padding=4),
    )  # fmt: skip
    loader.small = [(6, 6)]  # the run's first 6 batches at 6x6: 4 in epoch 0, 2 in epoch 1
    sides, padded = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, _ in loader:
            sides.append(x.shape[-1])
            padded.append(bool((x == 0).any()))  # zero padding shows as black pixels
    assert sides == [6] * 6 + [8] * 2
    assert not any(padded[:6])  # small crops: inside the image
    assert all(padded[6:])  # full-size crops: padding 4 on an 8-pixel image always shows


def test_final_flip_tta_reuses_the_plain_pass_for_its_first_view(tmp_path, monkeypatch):
    calls: list[int] = []
    cls = type(build("cifar", num_classes=4))
    forward = cls.forward
    monkeypatch.setattr(
        cls, "forward", lambda self, x: (calls.append(self.training), forward(self, x))[1]
    )
    _, res = run(tmp_path, "tta=flip", "eval_every=2")  # 16 val images in 2 batches of 8
    assert calls.count(False) == 4  # each batch: the plain pass + its mirror, not 3 passes
    row = res.history[-1]
    assert {"val_acc", "val_aux1_acc", "val_tta_acc", "val_tta_s"} <= row.keys()


def test_validation_abandoned_in_a_cut_short_pass_saves_that_pass_as_done(tmp_path, monkeypatch):
    import googlenet.training.validation as validation
    from googlenet.training.interrupt import Interrupted

    real = validation.validate
    monkeypatch.setattr(validation, "validate", lambda *a, **k: None)  # as if Ctrl-C came in it
    with pytest.raises(Interrupted):
        run(tmp_path, "epochs=1.5")  # 48 images, batch 8: 6 steps, then 3 of the next 6
    state = load_checkpoint(tmp_path / "run" / "last.safetensors")[1].training
    assert (state.epoch, state.step) == (1, 3)  # the cut-short pass's 3 steps, not 6
    monkeypatch.setattr(validation, "validate", real)
    cfg = tiny(tmp_path, "epochs=1.5")
    res = train(cfg, train_set=synth(48, 0), val_set=synth(16, 1), progress=False, resume=True)
    assert "val_acc" in res.history[-1]


_MALLINFO = """
import ctypes, sys, torch
from googlenet.devices import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped_by_a_large_tensor():
    before = libc.mallinfo2().hblkhd  # bytes in blocks mmap'd apart from the heap
    x = torch.empty(64 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before
print(mapped_by_a_large_tensor() >= 64 << 20, keep_freed_memory(), mapped_by_a_large_tensor())
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="no glibc")
def test_keep_freed_memory_serves_large_tensors_from_the_kept_heap():
    import subprocess
    import sys

    # its own process: the setting is process-wide and lasting
    out = subprocess.run([sys.executable, "-c", _MALLINFO], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "0"], out.stderr


def test_keep_freed_memory_is_a_config_key_applied_on_cpu_runs(tmp_path, monkeypatch):
    import googlenet.training.setup as setup

    calls = []
    monkeypatch.setattr(setup, "keep_freed_memory", lambda: calls.append(1) or True)
    run(tmp_path, "keep_freed_memory=false", "epochs=1")
    assert calls == []
    run(tmp_path / "b", "epochs=1")
    assert calls == [1]
