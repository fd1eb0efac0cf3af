from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import googlenet
from googlenet.cli import main
from googlenet.errors import UserError
from googlenet.infer.inference import iter_image_files, load
from googlenet.transforms import Preprocess
from tests.conftest import CLASSES, make_checkpoint, random_image


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "run" / "best.safetensors")


def test_predict_accepts_paths_pil_and_tensors_alike(ckpt: Path, tmp_path: Path):
    arr = random_image(40, 56, 1)
    Image.fromarray(arr).save(tmp_path / "a.png")
    model = googlenet.load(ckpt.parent)  # a run folder resolves to best.safetensors
    as_uint8 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    preds = model.predict(
        [tmp_path / "a.png", Image.fromarray(arr), as_uint8, as_uint8.float() / 255], top_k=2
    )
    assert len(preds) == 4 and preds[0].source == str(tmp_path / "a.png")
    for p in preds[1:]:
        assert p.index == preds[0].index and p.label == CLASSES[p.index]
        assert p.prob == pytest.approx(preds[0].prob, abs=1e-5)
    assert len(preds[0].topk) == 2 and preds[0].topk[0] == (preds[0].label, preds[0].prob)
    assert preds[0].topk[0][1] >= preds[0].topk[1][1]
    single = model.predict(Image.fromarray(arr))  # one image -> a list of one
    assert len(single) == 1 and single[0].index == preds[0].index


def test_predict_tensor_gives_probabilities(ckpt: Path):
    model = load(ckpt)
    probs = model.predict_tensor(torch.randn(4, 3, 32, 32))
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert (probs >= 0).all()


def test_preprocess_resizes_shorter_side_and_centre_crops():
    img = torch.zeros(3, 32, 64, dtype=torch.uint8)
    img[:, :, 32:] = 255  # right half white
    pp = Preprocess(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=32)
    x = pp(img)
    assert x.shape == (3, 32, 32)
    assert (x[:, :, :16] == 0).all() and (x[:, :, 16:] == 1).all()  # columns 16..48 kept
    big = pp(torch.zeros(1, 3, 100, 50, dtype=torch.uint8))
    assert big.shape == (1, 3, 32, 32)
    pp256 = Preprocess(input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, resize=16)
    y = pp256(torch.full((1, 3, 20, 40), 255, dtype=torch.uint8))
    assert y.shape == (1, 3, 8, 8) and torch.allclose(y, torch.ones_like(y))


def test_predict_rejects_bad_inputs(ckpt: Path):
    model = load(ckpt)
    with pytest.raises(UserError, match="3 x H x W"):
        model.predict(torch.zeros(1, 32, 32))
    with pytest.raises(UserError, match="cannot classify"):
        model.predict([123])


def _mixed_folder(root: Path) -> tuple[list[Path], list[Path]]:
    (root / "sub").mkdir(parents=True)
    good = [root / "a.png", root / "sub" / "b.jpg", root / "sub" / "c.bmp"]
    Image.fromarray(random_image(30, 45, 2)).save(good[0])
    Image.fromarray(random_image(64, 40, 3)).save(good[1], quality=90)
    Image.fromarray(random_image(20, 20, 4)).convert("L").save(good[2])
    text = root / "notes.txt"
    text.write_text("not an image\n")
    truncated = root / "sub" / "broken.jpg"
    buf = good[1].read_bytes()
    truncated.write_bytes(buf[: len(buf) // 2])
    (root / ".hidden.png").write_bytes(b"ignored")
    return good, [text, truncated]


def test_cli_predict_folder_reports_bad_files_and_continues(ckpt: Path, tmp_path: Path, capsys):
    good, bad = _mixed_folder(tmp_path / "imgs")
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--top-k", "2"]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(map(str, good))
    assert all(any(c in line for c in CLASSES) and "%" in line for line in lines)
    err_lines = [line for line in err.strip().splitlines() if "could not be read" not in line]
    assert len(err_lines) == 2
    for b in bad:
        assert sum(str(b) in line for line in err_lines) == 1
    assert ".hidden" not in out + err


def test_cli_predict_json_lines(ckpt: Path, tmp_path: Path, capsys):
    good, _ = _mixed_folder(tmp_path / "imgs")
    assert main(["predict", str(ckpt), str(good[0]), str(good[1]), "--json", "--top-k", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in rows] == [str(good[0]), str(good[1])]
    for r in rows:
        assert r["label"] in CLASSES and len(r["topk"]) == 3
        assert sum(t["prob"] for t in r["topk"]) == pytest.approx(1.0, abs=1e-4)


def test_cli_predict_missing_file_is_reported(ckpt: Path, tmp_path: Path, capsys):
    assert main(["predict", str(ckpt), str(tmp_path / "nope.png")]) == 1
    assert "nope.png" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_cli_bad_checkpoint_exits_2_with_one_line(tmp_path: Path, capsys, command: str):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    extra = {"predict": [str(tmp_path)], "evaluate": [], "export": ["--format", "torchscript"]}
    for ckpt in (tmp_path / "missing.safetensors", corrupt):
        assert main([command, str(ckpt), *extra[command]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ckpt.name in err


def test_iter_image_files_recurses_sorted(tmp_path: Path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.png", ".x/3.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files([tmp_path])]
    assert found == ["1.png", "b/2.png"]


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_cli_device_option(ckpt: Path, tmp_path: Path, capsys, command: str):
    data = tmp_path / "data"
    for c in CLASSES:
        (data / c).mkdir(parents=True)
        Image.fromarray(random_image(36, 44, len(c))).save(data / c / "a.png")
    extra = {
        "predict": [str(data)],
        "evaluate": ["--data", str(data), "--out", str(tmp_path / "eval")],
        "export": ["--format", "torchscript", "--out", str(tmp_path / "m.pt")],
    }[command]
    assert main([command, str(ckpt), *extra, "--device", "cpu"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main([command, str(ckpt), *extra, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no CUDA GPU" in err


def _odd_pictures(folder: Path) -> list[Path]:
    """Pictures whose naive RGB conversion differs from a careful one: half-transparent RGBA,
    a palette with a transparent colour, 16-bit grey, and a JPEG with an EXIF rotation."""
    arr = random_image(36, 48, 2)
    rgba = Image.fromarray(arr).convert("RGBA")
    rgba.putalpha(Image.fromarray(random_image(36, 48, 3)[..., 0]))
    rgba.save(folder / "alpha.png")
    palette = Image.fromarray(arr).convert("P")
    palette.save(folder / "palette.png", transparency=int(palette.getpixel((0, 0))))
    grey = (random_image(36, 48, 4)[..., 0].astype("uint16") * 257).astype("uint16")
    Image.fromarray(grey).save(folder / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(arr).save(folder / "rotated.jpg", exif=exif, quality=95)
    return [folder / n for n in ("alpha.png", "palette.png", "grey16.png", "rotated.jpg")]


def test_a_pil_image_and_its_file_give_the_same_prediction(ckpt: Path, tmp_path: Path):
    model = googlenet.load(ckpt)
    for path in _odd_pictures(tmp_path):
        from_file = model.predict(path, top_k=3)[0]
        with Image.open(path) as im:
            from_pil = model.predict(im, top_k=3)[0]
        assert from_pil.topk == from_file.topk, path.name


def test_pil_images_obey_the_file_limits(ckpt: Path):
    model = googlenet.load(ckpt)
    with pytest.raises(UserError, match="aspect ratio"):
        model.predict(Image.new("RGB", (5050, 50)))
