"""The C max-pool kernel (fastpool.py) computes nn.MaxPool2d(3, stride, padding) exactly: same
outputs bit for bit, gradients routed to the same winners (ties and NaNs included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from googlenet import fastpool
from googlenet.fastpool import MaxPool3, use_fast_pool
from googlenet.model import build

pytestmark = pytest.mark.skipif(fastpool.library() is None, reason="no C compiler here")


def _input(n: int, c: int, h: int, w: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if ties:  # few distinct values: many windows hold their maximum twice or more
        x = torch.randint(-3, 3, (n, c, h, w), generator=g).float()
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("shape", "ties", "stride", "pad", "ceil"),
    [((2, 16, 8, 8), False, 1, 1, False), ((3, 5, 7, 9), True, 1, 1, False),
     ((1, 64, 4, 4), True, 1, 1, True), ((4, 3, 1, 5), True, 1, 1, False),
     ((2, 33, 16, 16), False, 1, 1, True),
     # the stage pools: padded (paper, cifar) and ceil-mode (torchvision), odd and even sides
     ((2, 16, 16, 16), False, 2, 1, False), ((3, 7, 9, 8), True, 2, 1, False),
     ((2, 24, 15, 15), True, 2, 0, True), ((1, 9, 14, 11), False, 2, 0, True),
     ((2, 5, 7, 6), True, 2, 1, True), ((2, 6, 9, 9), True, 2, 0, False),
     ((1, 4, 10, 10), True, 3, 1, False), ((2, 8, 6, 5), True, 1, 0, False)],
)  # fmt: skip
def test_forward_and_gradient_equal_aten(shape, ties, stride, pad, ceil):
    x = _input(*shape, seed=sum(shape), ties=ties)
    pool = MaxPool3(stride, pad, ceil_mode=ceil)
    a = x.clone().requires_grad_()
    b = x.float().clone().requires_grad_()  # ATen in fp32: the same values, the same winners
    ya = pool(a)
    yb = F.max_pool2d(b, 3, stride, pad, ceil_mode=ceil)
    assert ya.dtype == torch.bfloat16 and ya.is_contiguous(memory_format=torch.channels_last)
    assert ya.shape == yb.shape
    assert torch.equal(ya.float(), yb)
    assert torch.equal(ya, F.max_pool2d(x, 3, stride, pad, ceil_mode=ceil))  # and ATen in bf16
    # small integer gradients: every sum is exact, so the routing is compared exactly
    g = torch.randint(-4, 5, ya.shape, generator=torch.Generator().manual_seed(1)).float()
    ya.backward(g.to(torch.bfloat16))
    yb.backward(g)
    assert torch.equal(a.grad.float(), b.grad)
    # and any gradient: the same bf16 additions in the same order as ATen's bf16 kernel
    c = x.clone().requires_grad_()
    a.grad = None
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    pool(a).backward(g)
    F.max_pool2d(c, 3, stride, pad, ceil_mode=ceil).backward(g)
    assert torch.equal(a.grad, c.grad)


def test_the_kernel_runs_for_each_case_above(monkeypatch):
    """The comparisons above would pass trivially if MaxPool3 fell back to ATen."""
    calls = []
    apply = fastpool._MaxPool3.apply
    monkeypatch.setattr(fastpool._MaxPool3, "apply", lambda *a: calls.append(a) or apply(*a))
    for stride, pad, ceil in ((1, 1, False), (2, 1, False), (2, 0, True)):
        MaxPool3(stride, pad, ceil)(_input(2, 4, 9, 9, seed=0, ties=False))
    assert len(calls) == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="padding 0 or 1; got 2, 2"):
        MaxPool3(2, 2)


def test_nan_wins_as_in_aten():
    x = _input(1, 8, 5, 5, seed=0, ties=False)
    x[0, 2, 2, 2] = float("nan")
    x[0, 5, 0, 0] = float("nan")
    y = MaxPool3()(x)
    ref = F.max_pool2d(x, 3, 1, 1)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().sum() == 9 + 4
    assert torch.equal(y.nan_to_num(), ref.nan_to_num())


def test_other_inputs_go_to_aten():
    x = torch.randn(2, 4, 6, 6)  # fp32, NCHW: not the kernel's case
    assert torch.equal(MaxPool3()(x), F.max_pool2d(x, 3, 1, 1))
    before = fastpool._MaxPool3.apply
    called = []
    fastpool._MaxPool3.apply = lambda *a: called.append(a) or before(*a)
    try:
        MaxPool3()(x.to(torch.bfloat16))  # bf16 but NCHW
        MaxPool3()(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    finally:
        fastpool._MaxPool3.apply = before
    assert len(called) == 1


def test_use_fast_pool_swaps_the_pool_branches_and_keeps_the_output():
    torch.manual_seed(0)
    model = build("cifar", num_classes=10).eval()
    ref = build("cifar", num_classes=10).eval()
    ref.load_state_dict(model.state_dict())
    # inception 3a, 3b, 4a-4e, 5a, 5b (3x3/1) and maxpool2-4 (3x3/2; cifar has no maxpool1)
    assert use_fast_pool(model) == 12
    assert sum(isinstance(m, MaxPool3) for m in model.modules()) == 12
    assert not any(type(m) is nn.MaxPool2d for m in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model, ref = (m.to(memory_format=torch.channels_last) for m in (model, ref))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(x), ref(x))


def test_inference_runs_the_kernel_with_the_same_logits():
    """devices.make_runner (evaluate, predict, serve, load) swaps the pools in where they apply."""
    from googlenet.devices import make_runner

    torch.manual_seed(0)
    model = build("cifar", num_classes=10).eval()
    ref = build("cifar", num_classes=10).eval().to(memory_format=torch.channels_last)
    ref.load_state_dict(model.state_dict())
    run = make_runner(model, "cpu", torch.bfloat16, channels_last=True)
    assert sum(isinstance(m, MaxPool3) for m in model.modules()) == 12
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = ref(x.contiguous(memory_format=torch.channels_last)).float()
    assert torch.equal(run(x), expected)
    fp32 = build("cifar", num_classes=10)
    make_runner(fp32, "cpu", None)  # fp32: ATen's pools stay
    assert not any(isinstance(m, MaxPool3) for m in fp32.modules())


def test_the_kernel_shares_torchs_openmp_runtime_or_runs_on_the_calling_thread(monkeypatch):
    before = fastpool._gomp_files()
    assert len(before) <= 1  # loaded by the tests above: no second copy of libgomp came in
    # where loading it brings in a libgomp of its own, the serial build is taken instead
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here: the kernel is built without it")
    built, compile_ = [], fastpool._compile
    monkeypatch.setattr(fastpool, "_compile", lambda cc, o: built.append(o) or compile_(cc, o))
    maps = iter([set(), {"/x/libgomp.so.1"}] + [{"/x/libgomp.so.1"}] * 4)
    monkeypatch.setattr(fastpool, "_gomp_files", lambda: next(maps))
    monkeypatch.setattr(fastpool, "_state", {})
    assert fastpool.library() is not None
    assert built == [True, False]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(fastpool, "_state", {})
    monkeypatch.setenv("GOOGLENET_FAST_POOL", "0")
    assert fastpool.library() is None
    assert use_fast_pool(build("cifar", num_classes=10)) == 0


def test_an_unwritable_cache_falls_back_to_aten(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a cache path below a file cannot be created, even by root
    monkeypatch.setenv("GOOGLENET_CACHE", str(blocker / "googlenet"))
    monkeypatch.setattr(fastpool, "_state", {})
    assert fastpool.library() is None
    model = build("cifar", num_classes=10).eval()
    assert use_fast_pool(model) == 0
    with torch.autocast("cpu", torch.bfloat16):  # the bf16 CPU path runs on ATen's pools
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pools_the_kernel_does_not_take_stay_aten():
    model = build("bn", num_classes=10)  # torchvision's: ceil-mode 3x3/2 pools, 2x2 maxpool4
    assert use_fast_pool(model) == 9 + 3
    assert type(model.maxpool4) is nn.MaxPool2d and isinstance(model.maxpool3, MaxPool3)
    assert model.maxpool3.ceil_mode and model.maxpool3.padding == 0


def test_training_with_the_kernel_matches_aten(tmp_path):
    """A bf16 channels-last run trains bit-identically with and without the kernel."""
    from googlenet.training.config import resolve_config
    from googlenet.training.loop import train
    from tests.conftest import synth

    results = {}
    for on in (True, False):
        cfg = resolve_config(overrides=[
            f"out={tmp_path / str(on)}", "input_size=16", "batch_size=8", "epochs=1",
            "precision=bf16", "channels_last=true", f"fast_pool={str(on).lower()}",
            "warmup_min_steps=0", "tta=none", "whiten_init=false",
        ])  # fmt: skip
        results[on] = train(cfg, train_set=synth(32, 0), val_set=synth(16, 1), progress=False)
    pools = [isinstance(m, MaxPool3) for m in results[True].model.modules()]
    assert sum(pools) == 12 and not any(
        isinstance(m, MaxPool3) for m in results[False].model.modules()
    )
    a, b = (results[k].model.state_dict() for k in (True, False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[True].metrics["val_loss"] == results[False].metrics["val_loss"]


def test_build_kernel_command_builds_into_the_cache_once(monkeypatch, tmp_path, capsys):
    from googlenet.cli import main

    monkeypatch.setenv("GOOGLENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fastpool, "_state", {})
    assert main(["build-kernel"]) == 0
    path = Path(capsys.readouterr().out.split(": ", 1)[1].strip())
    assert path.parent == tmp_path / "cache" and path.suffix == ".so" and path.is_file()
    assert fastpool.library() is not None  # the built one, without building again
    stamp = path.stat().st_mtime_ns
    assert main(["build-kernel"]) == 0  # a cache hit: same file, not rebuilt
    assert str(path) in capsys.readouterr().out and path.stat().st_mtime_ns == stamp


def test_build_kernel_refuses_when_off_or_unwritable(monkeypatch, tmp_path, capsys):
    from googlenet.cli import main

    monkeypatch.setattr(fastpool, "_state", {})
    monkeypatch.setenv("GOOGLENET_FAST_POOL", "0")
    assert main(["build-kernel"]) == 2
    assert "GOOGLENET_FAST_POOL=0" in capsys.readouterr().err
    monkeypatch.delenv("GOOGLENET_FAST_POOL")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GOOGLENET_CACHE", str(blocker / "googlenet"))
    assert main(["build-kernel"]) == 2
    err = capsys.readouterr().err
    assert "could not build the max-pool kernel" in err and len(err.splitlines()) == 1
