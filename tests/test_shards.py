"""`googlenet shards`: WebDataset shards written from an image folder, read back for training."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from googlenet.cli import main
from googlenet.data.shards import read_index, write_shards
from googlenet.errors import UserError

CLASSES = ["cat", "dog", "eel"]


def _photo(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_folder(root: Path, n_train: int = 4, n_val: int = 2) -> dict[str, list[Path]]:
    """root/{train,val}/<class>/: JPEGs of several sizes, a PNG with alpha, a BMP."""
    files: dict[str, list[Path]] = {"train": [], "val": []}
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                k += 1
                w, h = [(120, 90), (40, 60), (200, 150), (30, 30)][i % 4]
                im = _photo(k, w, h)
                if i % 4 == 1:
                    p = d / f"{i}.png"
                    im.convert("RGBA").save(p)
                elif i % 4 == 3:
                    p = d / f"{i}.bmp"
                    im.save(p)
                else:
                    p = d / f"{i}.jpg"
                    im.save(p, quality=90)
                files[split].append(p)
    return files


def read_tar_samples(paths: list[Path]) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                f = tar.extractfile(m)
                assert f is not None
                key, ext = m.name.split(".", 1)
                samples[f"{path.name}/{key}"][ext] = f.read()
    return list(samples.values())


def test_write_shards_stores_every_image_with_its_class(tmp_path):
    files = make_folder(tmp_path / "data")
    report = write_shards(tmp_path / "data", tmp_path / "shards", shard_size_mb=0.05, workers=1)
    meta = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert meta["classes"] == CLASSES and report.classes == CLASSES
    index = read_index(tmp_path / "shards")
    for split in ("train", "val"):
        tars = sorted((tmp_path / "shards").glob(f"{split}-*.tar"))
        assert [t.name for t in tars] == sorted(meta["splits"][split]["shards"])
        assert len(index.urls(split)) == len(tars)
        samples = read_tar_samples(tars)
        assert len(samples) == len(files[split]) == index.samples(split)
        # every file once, with its class; JPEG/PNG bytes unchanged, BMP converted losslessly
        want = collections.Counter()
        for p in files[split]:
            label = CLASSES.index(p.parent.name)
            with Image.open(p) as im:
                want[(np.asarray(im.convert("RGB")).tobytes(), label)] += 1
        got = collections.Counter()
        for s in samples:
            (ext,) = set(s) - {"cls"}
            assert ext in ("jpg", "png")
            with Image.open(io.BytesIO(s[ext])) as im:
                pixels = np.asarray(im.convert("RGB"))
            got[(pixels.tobytes(), int(s["cls"]))] += 1
        raw = {p.read_bytes() for p in files[split] if p.suffix in (".jpg", ".png")}
        assert raw <= {s.get("jpg", s.get("png")) for s in samples}
        assert got == want
    assert len(meta["splits"]["train"]["shards"]) > 1  # 0.05 MB shards: the size limit splits


def test_max_side_bounds_stored_size(tmp_path):
    files = make_folder(tmp_path / "data")
    report = write_shards(tmp_path / "data", tmp_path / "s", max_side=64, workers=1)
    samples = read_tar_samples(sorted((tmp_path / "s").glob("*.tar")))
    sizes = []
    for s in samples:
        data = s.get("jpg", s.get("png"))
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(im.size)
    assert max(max(wh) for wh in sizes) == 64
    assert (30, 30) in sizes and (40, 60) in sizes  # small images keep their size
    big = sum(1 for split in files.values() for p in split if max(Image.open(p).size) > 64)
    assert big > 0 and report.splits["train"].reencoded + report.splits["val"].reencoded >= big


def test_unreadable_images_are_skipped_and_counted_up_to_a_threshold(tmp_path):
    make_folder(tmp_path / "data", n_train=4)
    bad = tmp_path / "data" / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with (
        pytest.raises(UserError, match=r"1 of 13 images are unreadable.*broken\.jpg"),
        pytest.warns(UserWarning, match=r"skipping .*broken\.jpg"),
    ):
        write_shards(tmp_path / "data", tmp_path / "a", workers=1)
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        report = write_shards(tmp_path / "data", tmp_path / "b", workers=1, max_bad=0.1)
    assert report.splits["train"].samples == 12 and len(report.splits["train"].skipped) == 1
    meta = json.loads((tmp_path / "b" / "classes.json").read_text())
    assert meta["splits"]["train"]["skipped"] == 1


def test_val_sub_folders_map_onto_the_classes_by_the_one_rule(tmp_path):
    """As training's val/ and evaluate: case, '_' and '-' ignored; two sub-folders of one
    class name are an error naming both (before: 'CAT' was refused as no train class)."""
    make_folder(tmp_path / "data", n_train=1, n_val=1)
    (tmp_path / "data" / "val" / "cat").rename(tmp_path / "data" / "val" / "CAT")
    write_shards(tmp_path / "data", tmp_path / "a", workers=1)
    val = read_tar_samples(sorted((tmp_path / "a").glob("val-*.tar")))
    assert sorted(int(s["cls"]) for s in val) == [0, 1, 2]
    (tmp_path / "data" / "val" / "Dog").mkdir()
    with pytest.raises(UserError, match=r"'Dog' and 'dog' name the same class"):
        write_shards(tmp_path / "data", tmp_path / "b", workers=1)


def test_cli_shards_and_refusals(tmp_path, capsys):
    make_folder(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "shards"
    assert main(["shards", str(tmp_path / "data"), "--out", str(out), "--workers", "2"]) == 0
    assert "train: 6 images in 1 shards" in capsys.readouterr().out
    assert (out / "train-000000.tar").is_file() and (out / "val-000000.tar").is_file()
    # an existing shard folder is never overwritten
    assert main(["shards", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    assert main(["shards", str(tmp_path / "noval"), "--out", str(tmp_path / "x")]) == 2
    assert "no val/" in capsys.readouterr().err
    assert main(["shards", str(tmp_path / "data"), "--out", str(tmp_path / "y"),
                 "--max-side", "4"]) == 2  # fmt: skip
    (out / "classes.json").write_text("{}")
    with pytest.raises(UserError, match="classes.json: not a googlenet-shards/1 index"):
        read_index(out)


def _samples(loader, size: int = 16) -> collections.Counter:
    """The multiset of (uint8 pixels, label) a loader yields in one epoch (mean 0, std 1)."""
    out: collections.Counter = collections.Counter()
    for x, y in loader:
        assert x.shape[1:] == (3, size, size)
        pixels = (x * 255).round().to(torch.uint8)
        for img, label in zip(pixels, y.tolist(), strict=True):
            out[(img.numpy().tobytes(), label)] += 1
    return out


def _loaders(tmp_path, split: str, **kw):
    from googlenet.data import load_image_folder
    from googlenet.data.loader import BatchLoader
    from googlenet.data.shards import ShardLoader, load_shards
    from googlenet.transforms import Preprocess

    sets = dict(zip(("train", "val"), load_shards(tmp_path / "shards"), strict=True))
    common = dict(preprocess=Preprocess(16, (0.0,) * 3, (1.0,) * 3))
    folder = load_image_folder(tmp_path / "data" / split, size=16)
    return (
        BatchLoader(folder, 4, **common),
        ShardLoader(sets[split], 4, size=16, buffer=5, **common, **kw),
    )


def test_shards_give_the_folders_epoch_multiset(tmp_path):
    make_folder(tmp_path / "data")  # 12 train, 6 val images of several sizes and formats
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size_mb=0.05, workers=1)
    folder, shards = _loaders(tmp_path, "train", shuffle=True, drop_last=True)
    want = _samples(folder)
    assert sum(want.values()) == 12 and len(shards) == 3
    epochs = []
    for epoch in (0, 1):
        shards.set_epoch(epoch)
        assert _samples(shards) == want  # one rank, one stream: each sample once per epoch
        epochs.append([y.tolist() for _, y in shards])
    assert epochs[0] != epochs[1]  # reshuffled per epoch (shard order and buffer)
    shards.set_epoch(0)
    assert [y.tolist() for _, y in shards] == epochs[0]  # ... as a function of the epoch
    # evaluation through 2 DataLoader worker processes: each val sample exactly once
    folder, shards = _loaders(tmp_path, "val", workers=2)
    assert _samples(shards) == _samples(folder) and sum(_samples(folder).values()) == 6


def test_shards_split_by_rank(tmp_path):
    make_folder(tmp_path / "data", n_train=4, n_val=4)
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size_mb=0.02, workers=1)
    want = _samples(_loaders(tmp_path, "val")[0])
    got: collections.Counter = collections.Counter()
    for rank in (0, 1):
        _, shards = _loaders(tmp_path, "val", rank=rank, world_size=2)
        part = _samples(shards)
        assert 0 < sum(part.values()) < 12
        got += part
    assert got == want  # disjoint shares that add up to the split
    for rank in (0, 1):  # training: the same number of steps on every rank
        _, shards = _loaders(tmp_path, "train", rank=rank, world_size=2, shuffle=True)
        assert len(shards) == 1 and len(list(shards)) == 1


def test_train_from_shards(tmp_path):
    from googlenet.training.config import resolve_config
    from googlenet.training.loop import train

    make_folder(tmp_path / "data", n_train=4, n_val=2)
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size_mb=0.05, workers=1)
    cfg = resolve_config(
        overrides=[
            "dataset=shards",
            "input_size=16",
            "resize=16",
            "batch_size=4",
            "epochs=1",
            "precision=fp32",
            "channels_last=false",
            "loader_workers=0",
            f"out={tmp_path / 'run'}",
        ]
    )
    result = train(cfg, data_root=str(tmp_path / "shards"), progress=False)
    assert result.history[0]["epoch"] == 1 and 0 <= result.metrics["val_acc"] <= 100
    assert (tmp_path / "run" / "last.safetensors").is_file()


@pytest.mark.parametrize("setting", ["holdout=4", "limit_train=8", "limit_val=2"])
def test_holdout_and_limits_on_shards_are_refused_in_one_line(tmp_path, capsys, setting):
    """A stream has no seeded stratified sample to draw: refused by config validation, never
    ignored (before: limits were silently ignored and holdout raised AttributeError)."""
    from googlenet.data.build import DataConfig, load_data
    from googlenet.training.config import resolve_config

    key = setting.split("=")[0]
    with pytest.raises(UserError, match=rf"'{key}': not available with dataset 'shards'"):
        resolve_config(overrides=["dataset=shards", setting])
    make_folder(tmp_path / "data", n_train=1, n_val=1)
    write_shards(tmp_path / "data", tmp_path / "shards", workers=1)
    args = ["train", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run")]
    assert main([*args, "--set", "dataset=shards", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert "not available with dataset 'shards'" in err and len(err.splitlines()) == 1
    # training's own data set-up refuses it too (a config that skipped validation)
    cfg = DataConfig(dataset="shards", **{key: int(setting.split("=")[1])})
    with pytest.raises(UserError, match=key):
        load_data(cfg, tmp_path / "shards", None, tmp_path / "run")  # type: ignore[arg-type]


def test_streamed_shards_honour_max_bad_images(tmp_path):
    """The one rule (arrays.check_unreadable) with the config's share, not a fixed 1%."""
    from googlenet.data.build import DataConfig, load_data
    from googlenet.data.shards import ShardSet

    make_folder(tmp_path / "data", n_train=4, n_val=2)  # 12 training samples
    write_shards(tmp_path / "data", tmp_path / "shards", workers=1)
    cfg = DataConfig(dataset="shards", max_bad_images=0.1)
    train_set, val_set, _ = load_data(cfg, tmp_path / "shards", None, tmp_path)  # type: ignore[arg-type]
    assert isinstance(train_set, ShardSet) and train_set.max_bad == val_set.max_bad == 0.1
    with pytest.warns(UserWarning, match="one"):
        train_set.note_bad(["one"])  # 1 of 12: under 10%
    with (
        pytest.raises(UserError, match=r"2 of 12 train samples are unreadable \(more than 10%\)"),
        pytest.warns(UserWarning, match="two"),
    ):
        train_set.note_bad(["two"])
    strict = load_data(DataConfig(dataset="shards"), tmp_path / "shards", None, tmp_path)[0]  # type: ignore[arg-type]
    with pytest.raises(UserError, match="1 of 12"), pytest.warns(UserWarning):
        strict.note_bad(["one"])  # the default 1%
