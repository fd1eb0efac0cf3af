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
