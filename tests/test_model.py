from __future__ import annotations

import pytest
import torch

import googlenet
from googlenet import GoogLeNetOutputs, UserError, build, list_variants
from googlenet.model import INCEPTION_TABLE
from googlenet.summary import count_params, summary
from tests.conftest import reference_shapes

VARIANTS = list_variants()


def small_input(name: str, n: int = 2) -> torch.Tensor:
    side = googlenet.get_spec(name).input_size
    return torch.randn(n, 3, side, side)


def test_registry_lists_all_variants():
    assert set(VARIANTS) == {"paper", "article", "bn", "cifar"}


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_and_output_types(name):
    torch.manual_seed(0)
    model = build(name, num_classes=10)
    x = small_input(name)
    out = model.train()(x)
    assert isinstance(out, GoogLeNetOutputs)
    assert out._fields == ("logits", "aux1", "aux2")
    for t in out:
        assert t.shape == (2, 10)
    loss = out.logits.logsumexp(1).mean() + 0.3 * out.aux1.sum() + 0.3 * out.aux2.sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    with torch.no_grad():
        logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)


@pytest.mark.parametrize("name", VARIANTS)
def test_aux_off_has_no_aux_parameters(name):
    model = build(name, num_classes=10, aux_logits=False)
    assert model.aux1 is None and model.aux2 is None
    assert not [n for n, _ in model.named_parameters() if n.startswith("aux")]
    out = model.train()(small_input(name))
    assert out.aux1 is None and out.aux2 is None and out.logits.shape == (2, 10)
    with_aux = build(name, num_classes=10)
    assert count_params(with_aux) > count_params(model)


def test_article_has_the_tutorials_parameter_count():
    assert count_params(build("article", num_classes=10)) == 10_334_030


def test_inception_table_matches_paper_output_widths():
    widths = [w1 + w3 + w5 + wp for _, w1, _, w3, _, w5, wp in INCEPTION_TABLE]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    model = build("paper")
    assert model.inception4e.branch3[1].conv.kernel_size == (5, 5)
    assert isinstance(model.lrn1, torch.nn.LocalResponseNorm)
    assert model.num_classes == 1000


def test_bn_state_dict_matches_torchvision_listing():
    ref = reference_shapes()
    model = build("bn", num_classes=1000)
    sd = model.state_dict()
    assert list(sd) == list(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert count_params(model) == 13_004_888
    assert count_params(build("bn", aux_logits=False)) == 6_624_904
    # A state_dict built from the listing loads strict into a fresh model.
    fresh = {k: torch.randn(s) if s else torch.tensor(0) for k, s in ref.items()}
    build("bn").load_state_dict(fresh, strict=True)


def test_bn_reproduces_torchvision_quirks():
    m = build("bn")
    assert m.inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's "5x5" is 3x3
    assert m.maxpool4.kernel_size == 2 and m.maxpool1.ceil_mode
    assert m.conv1.bn.eps == 0.001 and m.conv1.conv.bias is None
    assert m.dropout.p == 0.2


def test_transform_input_maps_imagenet_normalised_to_half_scale():
    m = build("bn", transform_input=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    raw = torch.rand(1, 3, 4, 4)
    out = m._transform_input((raw - mean) / std)
    torch.testing.assert_close(out, (raw - 0.5) / 0.5)


def test_cifar_variant_runs_stages_at_16_8_4():
    s = summary(build("cifar"), (3, 32, 32))
    shapes = {r.name: r.output_shape for r in s.rows}
    assert shapes["inception3b"][1:] == (16, 16)
    assert shapes["inception4e"][1:] == (8, 8)
    assert shapes["inception5b"][1:] == (4, 4)
    assert 0.8e9 < s.flops < 1.1e9


def test_summary_totals_and_rows():
    s = summary(build("article", num_classes=10))
    assert s.total_params == 10_334_030
    assert sum(r.params for r in s.rows) == s.total_params
    names = [r.name for r in s.rows]
    assert names.index("aux1") == names.index("inception4a") + 1
    assert "Total params: 10,334,030" in str(s)
    assert 3.0e9 < s.flops < 3.3e9


@pytest.mark.parametrize("name", VARIANTS)
def test_init_is_reproducible_for_a_seed(name):
    torch.manual_seed(1)
    a = build(name, num_classes=10).state_dict()
    torch.manual_seed(1)
    b = build(name, num_classes=10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_article_init_glorot_bias():
    m = build("article", num_classes=10)
    assert torch.all(m.conv1.conv.bias == 0.2)
    w = m.conv1.conv.weight
    limit = (6 / (3 * 49 + 64 * 49)) ** 0.5
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 32, 32), "4-D"),
        ((1, 1, 32, 32), "3 input channels"),
        ((1, 4, 32, 32), "3 input channels"),
        ((1, 3, 8, 8), "smaller than the 16x16"),
    ],
)
def test_bad_input_raises_clear_value_error(shape, match):
    model = build("cifar").eval()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


@pytest.mark.parametrize("name", VARIANTS)
def test_min_input_size_runs(name):
    # The guard below min_input_size is a policy (the network itself still runs a pixel
    # smaller), so only the supported end is tested: the smallest supported size runs.
    model = build(name, num_classes=10, aux_logits=name in ("bn", "cifar")).train()
    side = googlenet.get_spec(name).min_input_size
    assert model(torch.randn(2, 3, side, side)).logits.shape == (2, 10)


@pytest.mark.parametrize("name", ["paper", "article"])
def test_paper_aux_heads_need_224ish_input_in_training(name):
    model = build(name, num_classes=10).train()
    model(torch.randn(2, 3, 209, 256))
    with pytest.raises(UserError, match="209..256"):
        model(torch.randn(2, 3, 208, 224))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_unknown_variant_and_option():
    with pytest.raises(ValueError, match="unknown variant 'resnet'.*paper"):
        build("resnet")
    with pytest.raises(ValueError, match="unknown model option 'widht'"):
        build("paper", widht=2)


def reference_forward(m, x):
    """The forward as it was before forward_features/forward_head existed, step for step."""
    if m.spec.transform_input:
        x = m._transform_input(x)
    x = m.maxpool1(m.conv1(x))
    if m.lrn1 is not None:
        x = m.lrn1(x)
    x = m.conv3(m.conv2(x))
    if m.lrn2 is not None:
        x = m.lrn2(x)
    x = m.maxpool2(x)
    x = m.inception3b(m.inception3a(x))
    x = m.inception4a(m.maxpool3(x))
    aux1 = m.aux1(x) if m.aux1 is not None and m.training else None
    x = m.inception4d(m.inception4c(m.inception4b(x)))
    aux2 = m.aux2(x) if m.aux2 is not None and m.training else None
    x = m.inception4e(x)
    x = m.inception5b(m.inception5a(m.maxpool4(x)))
    x = torch.flatten(m.avgpool(x), 1)
    logits = m.fc(m.dropout(x))
    return GoogLeNetOutputs(logits, aux1, aux2) if m.training else logits


def api_input(name: str, train: bool) -> torch.Tensor:
    # Paper-style aux heads train on 209..256 only; elsewhere the smallest side is enough.
    spec = googlenet.get_spec(name)
    side = spec.input_size if train and spec.aux_pool == 0 else spec.min_input_size
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("train", [False, True])
def test_forward_is_bit_identical_to_the_step_by_step_forward(name, train):
    torch.manual_seed(0)
    model = build(name, num_classes=7, transform_input=name == "bn").train(train)
    x = api_input(name, train)
    torch.manual_seed(5)  # the same dropout draws for both
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(5)
    with torch.no_grad():
        want = reference_forward(model, x)
    if train:
        assert [t is None for t in got] == [False] * 3
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_features_and_head_compose_to_forward(name):
    model = build(name, num_classes=7).eval()
    x = api_input(name, train=False)
    with torch.no_grad():
        feats = model.forward_features(x)
        side = googlenet.get_spec(name).min_input_size
        assert feats.shape[:2] == (2, 1024) and feats.shape[2] == feats.shape[3] < side
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.equal(pooled, feats.mean((2, 3)))
        assert torch.equal(model.forward_head(feats), model(x))
        assert torch.equal(model.fc(pooled), model(x))
    with pytest.raises(UserError, match="3 input channels"):
        model.forward_features(torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("name", VARIANTS)
def test_reset_classifier_replaces_fc_and_aux_heads(name):
    torch.manual_seed(0)
    model = build(name, num_classes=7).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.pretrained_cfg["num_classes"] == 3
    sd = model.state_dict()
    changed = {k for k in sd if k not in before or not torch.equal(sd[k], before[k])}
    heads = {f"{h}.{p}" for h in ("fc", "aux1.fc2", "aux2.fc2") for p in ("weight", "bias")}
    assert changed == heads  # the backbone and the aux heads' other layers are kept
    assert sd["fc.weight"].shape == (3, 1024) and sd["fc.weight"].dtype == torch.float64
    # Initialised as a fresh model of 3 classes initialises them (same scheme, same spread).
    fresh = build(name, num_classes=3).state_dict()
    for key in heads:
        new, want = sd[key].float(), fresh[key]
        assert new.shape == want.shape
        torch.testing.assert_close(new.mean(), want.mean(), rtol=0, atol=0.01)
        torch.testing.assert_close(new.std(), want.std(), rtol=0.3, atol=1e-6)
    out = model.train()(api_input(name, train=True).double())
    assert [t.shape for t in out] == [(2, 3)] * 3
    with pytest.raises(UserError, match="positive integer"):
        model.reset_classifier(0)


def test_reset_classifier_without_aux_heads():
    model = build("cifar", aux_logits=False)
    model.reset_classifier(4)
    assert model.aux1 is None and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_cfg_describes_the_variant_and_builds_its_preprocess(name):
    from googlenet.transforms import Preprocess

    model = build(name)
    cfg = model.pretrained_cfg
    spec = googlenet.get_spec(name)
    side = spec.input_size
    assert cfg["input_size"] == (3, side, side) and cfg["num_classes"] == spec.num_classes
    assert cfg["interpolation"] == "bilinear" and 0 < cfg["crop_pct"] <= 1
    # The named layers exist: first_conv takes 3 channels, classifier gives num_classes.
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.get_submodule(cfg["classifier"]).out_features == spec.num_classes
    pp = Preprocess.from_cfg(cfg)
    assert (pp.input_size, pp.mean, pp.std) == (side, cfg["mean"], cfg["std"])
    # ImageNet variants: torchvision's Resize(256) + CenterCrop(224); CIFAR images whole.
    assert pp.resize == {224: 256, 32: 32}[side]
    assert (pp.mean[0] == 0.485) == (name != "cifar")


def test_preprocess_from_a_bad_cfg_is_a_one_line_error():
    from googlenet.transforms import Preprocess

    cfg = build("cifar").pretrained_cfg
    with pytest.raises(UserError, match="missing key"):
        Preprocess.from_cfg({k: v for k, v in cfg.items() if k != "mean"})
    with pytest.raises(UserError, match="square input"):
        Preprocess.from_cfg(cfg | {"input_size": (3, 32, 40)})
    with pytest.raises(UserError, match="bilinear"):
        Preprocess.from_cfg(cfg | {"interpolation": "bicubic"})
