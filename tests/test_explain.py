from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import googlenet.insight as E
from googlenet.cli import main
from googlenet.errors import UserError
from googlenet.model import Inception, build
from tests.conftest import calibrate, make_checkpoint


class Const(nn.Module):
    """A branch whose output is known: `value` everywhere, `channels` wide."""

    def __init__(self, channels: int, value: float) -> None:
        super().__init__()
        self.channels, self.value = channels, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return torch.full((n, self.channels, h, w), self.value)


class Tiny(nn.Module):
    """One inception block (named like GoogLeNet's last) on the raw image, mean pool, linear."""

    def __init__(self, num_classes: int = 3, positive: bool = False) -> None:
        super().__init__()
        self.inception5b = Inception(3, 4, 2, 4, 2, 4, 4, bn=False, ceil_mode=False)
        self.fc = nn.Linear(16, num_classes)
        if positive:  # every conv weight > 0, no bias: activations grow with the input
            for m in self.inception5b.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.constant_(m.weight, 0.1)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.inception5b(x).mean((2, 3)))


def test_branch_shares_exact_on_a_hand_built_block():
    block = Inception(3, 2, 1, 3, 1, 1, 4, bn=False, ceil_mode=False)
    block.branch1, block.branch2 = Const(2, 1.0), Const(3, 2.0)
    block.branch3, block.branch4 = Const(1, 3.0), Const(4, 0.5)
    model = nn.Module()
    model.inception3a = block
    model.forward = lambda x: block(x)  # type: ignore[method-assign]
    usage = E.branch_energy(model, torch.zeros(2, 3, 4, 5))
    # energy = channels * positions * value^2, positions = 20
    expected = torch.tensor([2 * 1.0, 3 * 4.0, 1 * 9.0, 4 * 0.25], dtype=torch.float64) * 20
    assert torch.equal(usage.energy["inception3a"][0], expected)
    shares = usage.shares()["inception3a"]
    torch.testing.assert_close(shares[1], expected / expected.sum(), rtol=0, atol=1e-15)
    assert usage.widths["inception3a"] == (2, 3, 1, 4)
    per_ch = usage.shares(per_channel=True)["inception3a"][0]
    values = torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=torch.float64) * 20
    torch.testing.assert_close(per_ch, values / values.sum(), rtol=0, atol=1e-15)
    doc = usage.to_json()
    assert doc["mean"]["inception3a"]["5x5"] == round(9 * 20 / float(expected.sum()), 6)
    assert doc["per_channel"]["mean"]["inception3a"]["3x3"] == round(4 / 14.25, 6)


def test_branch_shares_sum_to_one_on_googlenet():
    torch.manual_seed(0)
    model = build("cifar", num_classes=10, aux_logits=False).eval()
    x = torch.randn(3, 3, 32, 32)
    usage = E.branch_energy(model, x)
    with torch.no_grad():
        torch.testing.assert_close(usage.outputs, model(x))
    names = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    assert list(usage.energy) == [f"inception{b}" for b in names]
    assert usage.widths["inception3a"] == (64, 128, 32, 32)
    for per_channel in (False, True):
        for s in usage.shares(per_channel).values():
            assert s.shape == (3, 4)
            torch.testing.assert_close(s.sum(1), torch.ones(3, dtype=torch.float64))
            assert (s > 0).all()


def corner_image(corner: str, side: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 3, side, side)
    rows = slice(0, 6) if corner[0] == "t" else slice(side - 6, side)
    cols = slice(0, 6) if corner[1] == "l" else slice(side - 6, side)
    x[:, :, rows, cols] = 1.0
    return x


@pytest.mark.parametrize("corner", ["tl", "br", "tr"])
def test_gradcam_lights_the_corner_holding_the_evidence(corner: str):
    model = Tiny(positive=True).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1] = 1.0  # class 1's evidence: activation anywhere
    cam = E.gradcam(model, corner_image(corner), 1, "inception5b")[0]
    assert cam.shape == (32, 32) and float(cam.max()) == pytest.approx(1.0)
    h = 16
    quads = {
        "tl": cam[:h, :h].sum(),
        "tr": cam[:h, h:].sum(),
        "bl": cam[h:, :h].sum(),
        "br": cam[h:, h:].sum(),
    }
    assert quads[corner] > 0.95 * cam.sum()
    peak = divmod(int(cam.argmax()), 32)
    assert (peak[0] < h) == (corner[0] == "t") and (peak[1] < h) == (corner[1] == "l")


def test_gradcam_equals_captums_layer_gradcam():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(1)
    model = build("cifar", num_classes=10, aux_logits=False)
    calibrate(model, 32)
    x = torch.randn(2, 3, 32, 32)
    cam = E.gradcam(model, x, [3, 7], "inception4c:3x3")
    module = E.resolve_layer(model, "4c:3x3")
    ref = captum.LayerGradCam(model, module).attribute(x, target=[3, 7], relu_attributions=True)
    ref = F.interpolate(ref.detach(), size=(32, 32), mode="bilinear")[:, 0]
    ref = ref / ref.flatten(1).amax(1).view(-1, 1, 1)
    assert float(cam.max()) == pytest.approx(1.0) and float(cam.min()) == 0.0
    torch.testing.assert_close(cam, ref, rtol=0, atol=1e-5)


def test_ablation_finds_the_only_branch_the_classifier_reads():
    torch.manual_seed(0)
    model = Tiny(num_classes=3).eval()
    x = torch.randn(60, 3, 8, 8) + torch.linspace(-2, 2, 60).view(-1, 1, 1, 1)
    with torch.no_grad():
        feats = model.inception5b.branch1(x).mean((2, 3)).sum(1)
        model.fc.weight.zero_()
        model.fc.weight[0, :4] = 1.0  # the classifier reads only branch1 (1x1, channels 0..3)
        model.fc.bias.copy_(torch.tensor([0.0, float(feats.median()), -1.0]))
        y = model(x).argmax(1)  # class 0 above the median, else 1; zeroed branch1 -> 1
    assert set(y.tolist()) == {0, 1}
    result = E.ablate(model, [(x[:30], y[:30]), (x[30:], y[30:])])
    assert result["baseline"] == 100.0 and result["n"] == 60
    drop = result["drop"]["inception5b"]
    assert drop["3x3"] == drop["5x5"] == drop["pool"] == 0.0
    assert drop["1x1"] == pytest.approx(100.0 * float((y == 0).float().mean()), abs=1e-3)
    torch.testing.assert_close(model(x).argmax(1), y)  # hooks removed afterwards


def test_feature_visualisation_raises_its_channel_far_above_other_images():
    torch.manual_seed(0)
    model = build("cifar", num_classes=10, aux_logits=False)
    calibrate(model, 16)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    layer, channels = "inception3a", [5, 70]  # one in the 1x1 branch, one in the 3x3
    img = E.visualise_feature(model, layer, channels, mean, std, size=16, steps=25, lr=0.1)
    assert img.shape == (2, 3, 16, 16) and float(img.min()) >= 0 and float(img.max()) <= 1
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(16, 3, 16, 16, generator=g)
    # Natural-image stand-ins: smooth random images (low frequencies dominate, as in photos).
    smooth = F.interpolate(torch.rand(16, 3, 4, 4, generator=g), size=16, mode="bicubic")
    others = torch.cat([noise, smooth.clamp(0, 1)])
    with torch.no_grad():
        for i, c in enumerate(channels):
            best = float(E.channel_activation(model, layer, [c], (img[i : i + 1] - m) / s)[0])
            base = E.channel_activation(model, layer, [c] * len(others), (others - m) / s)
            z = (best - float(base.mean())) / float(base.std())
            print(
                f"channel {c}: {best:.3f} vs others {float(base.mean()):.3f} +- "
                f"{float(base.std()):.3f} (max {float(base.max()):.3f}), z = {z:.1f}"
            )
            # Seen (torch 2.13 CPU): channel 5 1.81 vs others -0.10 +- 0.30 (max 0.36), z 6.3;
            # channel 70 3.01 vs 0.42 +- 0.63 (max 1.52), z 4.1. Well above: > 3 std over the
            # mean of 16 noise + 16 smooth images, and clearly above the best of them.
            assert z > 3 and best > float(base.max()) + float(base.std())


def test_filters_grid_shows_every_first_layer_filter():
    model = build("cifar", num_classes=10, aux_logits=False)  # conv1: 64 filters of 3x3
    grid = E.filters_grid(model, zoom=4)
    cell = 3 * 4 + 2
    assert grid.shape == (8 * cell + 2, 8 * cell + 2, 3) and grid.dtype == np.uint8
    w = model.conv1.conv.weight[0].detach()
    tile = grid[2 : 2 + 12 : 4, 2 : 2 + 12 : 4].astype(float) / 255  # filter 0, one px per tap
    expect = (w / (2 * w.abs().max()) + 0.5).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(tile, expect, atol=1 / 255 + 1e-6)


def test_resolve_layer_and_class_names_give_clear_errors():
    model = build("cifar", num_classes=10, aux_logits=False)
    assert E.resolve_layer(model, "4c") is model.inception4c
    assert E.resolve_layer(model, "inception4c:pool") is model.inception4c.branch4
    with pytest.raises(UserError, match="unknown block 'inception9z'"):
        E.resolve_layer(model, "inception9z")
    with pytest.raises(UserError, match="unknown branch '7x7'"):
        E.resolve_layer(model, "4c:7x7")
    assert E.class_index(["cat", "Dog"], "dog") == 1
    with pytest.raises(UserError, match="unknown class 'cow'"):
        E.class_index(["cat", "dog"], "cow")


def save_images(folder: Path, n: int, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_cli_explain_writes_every_file(tmp_path: Path, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "best.safetensors", input_size=16)  # fast
    images = save_images(tmp_path / "photos", 2)
    data = tmp_path / "data"
    for cls in ("cat", "dog", "ship"):
        save_images(data / cls, 1)
    out = tmp_path / "explain"
    argv = [str(ckpt), *map(str, images), "--out", str(out), "--class", "dog"]
    argv += ["--data", str(data), "--limit", "3", "--ablate", "--block", "inception4e"]
    assert main(["explain", *argv]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "ablation.json",
        "ablation.png",
        "branch_usage.json",
        "branch_usage.png",
        "filters.png",
        "gradcam_img0.png",
        "gradcam_img1.png",
    ]
    doc = json.loads((out / "branch_usage.json").read_text())
    assert set(doc["images"]) == {str(p) for p in images}
    assert doc["n"] == 3 and "3 images" in doc["mean_over"]
    for section in (doc, doc["per_channel"]):
        for block in section["mean"].values():
            assert sum(block.values()) == pytest.approx(1.0, abs=1e-5)
    ablation = json.loads((out / "ablation.json").read_text())
    assert ablation["n"] == 3 and len(ablation["drop"]) == 9
    for f in out.glob("*.png"):
        with Image.open(f) as im:
            assert im.size[0] > 100
    # An existing output is never silently replaced.
    assert main(["explain", str(ckpt), str(images[0]), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["explain", str(ckpt), str(images[0]), "--out", str(out), "--force"]) == 0


def test_cli_explain_bad_input_is_one_line(tmp_path: Path, capsys):
    ckpt = make_checkpoint(tmp_path / "best.safetensors", input_size=16)
    img = save_images(tmp_path, 1)[0]
    out = str(tmp_path / "x")
    assert main(["explain", str(ckpt), str(img), "--out", out, "--class", "cow"]) == 2
    assert "unknown class 'cow'" in capsys.readouterr().err
    assert main(["explain", str(ckpt), str(img), "--out", out, "--ablate"]) == 2
    assert "--ablate needs --data" in capsys.readouterr().err


def test_the_old_module_path_keeps_the_readme_functions():
    import googlenet.explain as old

    from googlenet.insight import branches, features
    from googlenet.insight.gradcam import gradcam

    assert old.branch_energy is branches.branch_energy and old.ablate is branches.ablate
    assert old.gradcam is gradcam
    assert old.filters_grid is features.filters_grid
    assert old.visualise_feature is features.visualise_feature


def test_explain_reads_and_runs_the_images_one_batch_at_a_time(tmp_path: Path, monkeypatch):
    """Every forward pass (probabilities, branch usage, Grad-CAM) sees at most batch_size
    images, and the first runs before the later images are read."""
    import googlenet.transforms
    from googlenet.infer.inference import load

    predictor = load(make_checkpoint(tmp_path / "best.safetensors", input_size=16))
    images = save_images(tmp_path / "photos", 5)
    reads: list[Path] = []
    forwards: list[tuple[int, int]] = []  # (images read so far, batch size)
    read_image = googlenet.transforms.read_image

    def counted(path, *a, **k):
        reads.append(Path(path))
        return read_image(path, *a, **k)

    monkeypatch.setattr(googlenet.transforms, "read_image", counted)
    predictor.model.register_forward_pre_hook(
        lambda _m, args: forwards.append((len(reads), args[0].shape[0]))
    )
    written = E.explain_files(predictor, images, tmp_path / "out", E.ExplainOptions(batch_size=2))
    assert max(size for _, size in forwards) <= 2
    assert reads == images and forwards[0][0] <= 2
    assert {p.name for p in written} >= {f"gradcam_img{i}.png" for i in range(5)}
