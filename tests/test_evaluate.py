from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from googlenet.cli import main
from googlenet.devices import make_runner
from googlenet.errors import UserError
from googlenet.infer.evaluate import (
    evaluate,
    evaluate_batches,
    format_result,
    load_members,
    write_report,
)
from googlenet.infer.inference import load
from googlenet.metrics import Metrics, read_predictions
from googlenet.transforms import Preprocess
from googlenet.tta import (
    PAPER_SCALES,
    View,
    ensemble_probs,
    merge_views,
    tta_crops,
    tta_probs,
    tta_views,
)
from tests.conftest import CLASSES, make_checkpoint, random_image

IDENTITY = Preprocess(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class FixedLogits(nn.Module):
    """Stub model: image i is filled with the value i; returns the i-th row of a logit table."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: Tensor) -> Tensor:
        ids = (x.mean((1, 2, 3)) * 255).round().long()
        return self.table[ids]


def constant_images(n: int, side: int = 32) -> Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, side, side).clone()


# 6 images, 7 classes. Label vs ranking of the logits:
TABLE = torch.tensor(
    [
        [9, 8, 7, 6, 5, 4, 3],  # label 0: top-1 right
        [9, 8, 7, 6, 5, 4, 3],  # label 1: rank 2 -> top-5 only
        [3, 4, 5, 6, 7, 8, 9],  # label 0: rank 7 -> wrong in top-5 too
        [0, 0, 0, 9, 0, 0, 0],  # label 3: top-1 right
        [1, 2, 3, 4, 5, 6, 7],  # label 2: rank 5 -> top-5 only
        [1, 9, 2, 3, 4, 5, 0],  # label 6: predicted 1, rank 7 -> wrong in top-5 too
    ],
    dtype=torch.float32,
)
LABELS = torch.tensor([0, 1, 0, 3, 2, 6])


@pytest.mark.parametrize("mode", ["none", "flip", "10crop", "144crop"])
def test_metrics_exact_with_stub_model(mode: str):
    runners = [(make_runner(FixedLogits(TABLE)), IDENTITY)]
    classes = [f"c{i}" for i in range(7)]
    images = constant_images(6)
    batches = [(images[:4], LABELS[:4], [0, 1, 2, 3]), (images[4:], LABELS[4:], [4, 5])]
    r = evaluate_batches(runners, batches, classes, mode)
    assert r.n == 6 and r.tta == mode
    assert r.top1 == pytest.approx(2 / 6)  # images 0 and 3
    # top-5 adds images 1 and 4
    assert r.top5 == pytest.approx(4 / 6)
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for true, pred in [(0, 0), (1, 0), (0, 6), (3, 3), (2, 6), (6, 1)]:
        expected[true, pred] += 1
    assert torch.equal(r.confusion, expected)
    assert r.per_class[0] == 0.5 and r.per_class[3] == 1.0 and r.per_class[1] == 0.0
    assert r.per_class[4] is None  # no samples of class 4


def test_metrics_top_k_capped_by_class_count():
    acc = Metrics(3)
    acc.update(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]), torch.tensor([2, 1]))
    r = acc.result(["a", "b", "c"])
    assert r.top1 == 0.5 and r.top5 == 1.0  # top-5 of 3 classes is top-3


def _check_boxes(views: list[View], h: int, w: int, s: int) -> None:
    for v in views:
        rh, rw = (v.scale, round(w * v.scale / h)) if h <= w else (round(h * v.scale / w), v.scale)
        assert v.top >= 0 and v.top + v.size <= rh
        assert v.left >= 0 and v.left + v.size <= rw
        assert v.size == s or v.size == v.scale  # a crop, or a whole square


@pytest.mark.parametrize(("h", "w"), [(300, 400), (400, 300)])
def test_144crop_geometry(h: int, w: int):
    views = tta_views(h, w, "144crop", 224)
    assert len(views) == 144 and len(merge_views(views)) == 144  # all distinct
    assert sorted({v.scale for v in views}) == list(PAPER_SCALES)
    assert sum(v.flip for v in views) == 72
    _check_boxes(views, h, w, 224)
    at256 = [v for v in views if v.scale == 256 and not v.flip]
    assert len(at256) == 18 and sum(v.size == 256 for v in at256) == 3  # 3 squares x 6
    long_side = 341  # 400 * 256 / 300
    if w > h:  # left, centre, right squares
        squares = {(v.top, v.left) for v in at256 if v.size == 256}
        assert squares == {(0, 0), (0, (long_side - 256) // 2), (0, long_side - 256)}
        assert {(v.top, v.left) for v in at256 if v.size == 224} >= {(0, 0), (32, 117 + 0)}
    else:  # top, centre, bottom squares
        squares = {(v.top, v.left) for v in at256 if v.size == 256}
        assert squares == {(0, 0), ((long_side - 256) // 2, 0), (long_side - 256, 0)}
    centre = [v for v in at256 if v.size == 224 and v.top == 16 and v.left == 16]
    assert len(centre) == 1  # centre crop of the first square


def test_144crop_tensors_match_geometry():
    x = torch.randint(0, 256, (2, 3, 36, 48), dtype=torch.uint8)
    views, crops = tta_crops(x, "144crop", 32)
    assert crops.shape == (2, 144, 3, 32, 32)
    i = views.index(View(37, 0, 0, 32))  # top-left corner crop at the first scale
    # int(37 * 48 / 36) = 49: the whole image resized, then cut, equals the one-step crop
    resized = F.interpolate(x.float() / 255, (37, 49), mode="bilinear", antialias=True)
    assert torch.allclose(crops[:, i], resized[..., :32, :32], atol=1e-5)
    j = views.index(View(37, 0, 0, 32, True))
    assert torch.equal(crops[:, j], crops[:, i].flip(-1))
    whole = views.index(View(37, 0, 12, 37))  # right square, resized to 32
    assert crops[:, whole].shape == (2, 3, 32, 32)


def test_144crop_on_square_cifar_image_merges_identical_squares():
    views = tta_views(32, 32, "144crop", 32)
    merged = merge_views(views)
    assert len(views) == 144 and len(merged) == 48  # left = centre = right square
    assert sum(v.weight for v in merged) == 144 and {v.weight for v in merged} == {3}
    assert sorted({v.scale for v in views}) == [37, 41, 46, 50]  # 32 * {256..352} / 224


def test_10crop_and_flip_geometry():
    views = tta_views(300, 400, "10crop", 224, resize=256)
    corners = {(v.top, v.left) for v in views}
    assert len(views) == 10 and sum(v.flip for v in views) == 5
    assert corners == {(0, 0), (0, 117), (32, 0), (32, 117), (16, 58)}  # 256 x 341 image
    cifar = tta_views(32, 32, "10crop", 32)  # no resize in meta: 32 * 256 / 224
    assert {v.scale for v in cifar} == {37} and len(merge_views(cifar)) == 10
    assert tta_views(32, 32, "flip", 32, 32) == [View(32, 0, 0, 32), View(32, 0, 0, 32, True)]
    with pytest.raises(UserError, match="TTA mode"):
        tta_views(32, 32, "5crop", 32)


def test_tta_probs_is_the_weighted_mean_over_all_crops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    pp = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for mode in ("10crop", "144crop"):  # the paper's crops: softmax averaged
        _, crops = tta_crops(x, mode, 32)
        with torch.no_grad():
            flat = (crops.flatten(0, 1) - 0.5) / 0.2
            expected = torch.softmax(model(flat), 1).view(3, crops.shape[1], 5).mean(1)
        got = tta_probs(make_runner(model), x, pp, mode, max_crops=7)  # many small chunks
        assert torch.allclose(got, expected, atol=1e-5), mode
    none = tta_probs(make_runner(model), x, pp, "none")
    with torch.no_grad():
        assert torch.allclose(none, torch.softmax(model(pp(x)), 1), atol=1e-6)


def _class_folder(root: Path, per_class: int = 2) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = random_image(32 + 8 * i, 40, 10 * c + i)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_ensemble_equals_mean_of_member_probabilities(tmp_path: Path):
    a = make_checkpoint(tmp_path / "a.safetensors", seed=1)
    b = make_checkpoint(tmp_path / "b.safetensors", seed=2)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    members = load_members([a, b])
    runners = [(make_runner(m.model), m.preprocess) for m in members]
    pa, pb = (load(c).predict_tensor(load(c).preprocess(x)) for c in (a, b))
    assert not torch.allclose(pa, pb, atol=1e-3)
    assert torch.allclose(ensemble_probs(runners, x), (pa + pb) / 2, atol=1e-6)

    data = _class_folder(tmp_path / "data")
    r = evaluate([a, b], data=data, batch_size=4)
    assert r.n == 6 and r.checkpoints == [str(a), str(b)]
    preds = []
    for c in range(len(CLASSES)):
        for i in range(2):
            img = torch.from_numpy(random_image(32 + 8 * i, 40, 10 * c + i)).permute(2, 0, 1)
            preds.append((c, int(ensemble_probs(runners, img.unsqueeze(0)).argmax())))
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for true, pred in preds:
        expected[true, pred] += 1
    assert torch.equal(r.confusion, expected)


def test_ensemble_rejects_different_classes(tmp_path: Path):
    a = make_checkpoint(tmp_path / "a.safetensors")
    b = make_checkpoint(tmp_path / "b.safetensors", classes=["x", "y", "z"])
    with pytest.raises(UserError, match="classes differ"):
        load_members([a, b])


def test_folder_with_unknown_class_is_rejected(tmp_path: Path):
    a = make_checkpoint(tmp_path / "a.safetensors")
    data = _class_folder(tmp_path / "data")
    (data / "zebra").mkdir()
    Image.fromarray(random_image(32, 32, 0)).save(data / "zebra" / "z.png")
    with pytest.raises(UserError, match="zebra"):
        evaluate([a], data=data)


def test_report_files_and_table(tmp_path: Path):
    runners = [(make_runner(FixedLogits(TABLE)), IDENTITY)]
    batches = [(constant_images(6), LABELS, list(range(6)))]
    r = evaluate_batches(runners, batches, [f"c{i}" for i in range(7)])
    files = write_report(r, tmp_path / "out")
    names = ["metrics.json", "confusion.json", "confusion.png", "predictions.csv"]
    assert [f.name for f in files] == names
    rows = read_predictions(files[3])
    assert [(r["index"], r["true"], r["predicted"]) for r in rows[:2]] == [
        ("0", "c0", "c0"),
        ("1", "c1", "c0"),
    ]
    metrics = json.loads(files[0].read_text())
    assert metrics["n"] == 6 and metrics["top1"] == pytest.approx(2 / 6)
    assert metrics["per_class"]["c3"] == 1.0 and metrics["per_class"]["c4"] is None
    cm = json.loads(files[1].read_text())
    assert cm["matrix"] == r.confusion.tolist() and cm["classes"][0] == "c0"
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_result(r)
    assert "top-1  33.33%" in table and "c3" in table


def test_cli_evaluate_folder_with_tta(tmp_path: Path, capsys, monkeypatch):
    import googlenet.devices

    kept = []  # the process-wide setting itself is tested in its own process (test_speedrun)
    monkeypatch.setattr(googlenet.devices, "keep_freed_memory", lambda: kept.append(1) or True)
    a = make_checkpoint(tmp_path / "run" / "best.safetensors")
    data = _class_folder(tmp_path / "data")
    (data / "cat" / "broken.png").write_bytes(b"garbage")
    code = main(["evaluate", str(a.parent), "--data", str(data), "--tta", "flip"])
    out, err = capsys.readouterr()
    assert code == 0 and "top-1" in out and "skipped 1 unreadable" in out
    assert "broken.png" in err
    metrics = json.loads((a.parent / "eval-flip" / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["tta"] == "flip"
    assert kept == [1]


@pytest.mark.cifar
def test_evaluate_on_real_cifar10_slice(tmp_path: Path, cifar_root: Path, capsys):
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    a = make_checkpoint(tmp_path / "c.safetensors", classes=names, dataset="cifar10")
    r = evaluate([a], data=cifar_root, limit=20, tta="10crop", batch_size=8)
    assert r.n == 20 and r.classes == names and 0.0 <= r.top1 <= r.top5 <= 1.0
    # --limit takes a seeded class-stratified sample: 2 of each of the 10 classes
    assert r.confusion.sum(1).tolist() == [2] * 10
    out = tmp_path / "o"
    args = ["evaluate", str(a), "--data", str(cifar_root), "--limit", "8", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 8
    assert "top-5" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metrics_returns_the_predictions_it_counted_even_on_ties(dtype):
    """Per-image records (val_predictions.csv) take the classes the counts used: with tied
    scores (common in bf16) a second argmax could pick another class than topk did."""
    scores = torch.zeros(6, 10, dtype=dtype)
    scores[:, 3] = scores[:, 7] = 1.0  # every row: a tie between class 3 and 7
    labels = torch.tensor([3, 7, 3, 7, 0, 1])
    m = Metrics(10)
    pred = m.update(scores, labels)
    assert set(pred.tolist()) <= {3, 7}
    assert int((pred == labels).sum()) == m.result([str(i) for i in range(10)]).topk_correct[1]
    counted = torch.zeros(10, 10, dtype=torch.int64)
    counted.index_put_((labels, pred), torch.ones(6, dtype=torch.int64), accumulate=True)
    assert torch.equal(m.confusion, counted)  # the confusion counted the same classes
