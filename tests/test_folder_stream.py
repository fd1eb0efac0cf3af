"""Image folders at scale: listing decodes nothing, a batch decodes only its own images,
unreadable files are skipped and counted as they are met (an error only past 1%)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from googlenet.data import folders, load_image_folder
from googlenet.data.augment import Augment
from googlenet.data.loader import BatchLoader
from googlenet.errors import UserError
from googlenet.transforms import Preprocess

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _jpeg(colour: tuple[int, int, int], side: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _folder(root: Path, per_class: int, classes: int = 10) -> None:
    """classes x per_class tiny JPEGs; class k is a flat grey of level 20 * k."""
    for k in range(classes):
        d = root / f"c{k:02d}"
        d.mkdir(parents=True)
        data = _jpeg((20 * k,) * 3)
        for i in range(per_class):
            (d / f"{i:05d}.jpg").write_bytes(data)


@pytest.fixture
def decodes(monkeypatch):
    """Every file the folder data set decodes, in call order."""
    seen: list[Path] = []
    real = folders.prepare_image

    def counting(path, *a, **k):
        seen.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(folders, "prepare_image", counting)
    return seen


def _loader(ds, batch: int, workers: int = 0, **kw) -> BatchLoader:
    return BatchLoader(ds, batch, preprocess=Preprocess(8, ZERO, ONE), workers=workers, **kw)


def test_twenty_thousand_files_list_without_decoding(tmp_path, decodes):
    _folder(tmp_path / "data", per_class=2000)
    ds = load_image_folder(tmp_path / "data", size=8, cache_dir=tmp_path / "run")
    loader = _loader(ds, 32, shuffle=True, drop_last=True, augment=Augment(flip=True))
    assert len(ds) == 20_000 and len(loader) == 625
    assert decodes == []  # listing, splitting into batches, len(): nothing decoded
    batch = loader.indices()[:32]
    x, y = next(iter(loader))
    assert sorted(decodes) == sorted(ds.paths[i] for i in batch.tolist())  # that batch only
    assert torch.equal(y, ds.labels[batch])
    level = x[:, 0].mean((1, 2)) * 255 / 20  # the class's grey level survives decoding
    assert (level - y).abs().max() < 0.2
    # a restart reads the cached listing: same files, still nothing decoded
    again = load_image_folder(tmp_path / "data", size=8, cache_dir=tmp_path / "run")
    assert again.paths == ds.paths and len(decodes) == 32


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_skipped_and_counted_during_an_epoch(tmp_path, workers):
    _folder(tmp_path / "data", per_class=25, classes=4)  # 100 files
    bad = tmp_path / "data" / "c02" / "00007.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    ds = load_image_folder(tmp_path / "data", size=8)
    with pytest.warns(UserWarning, match=r"skipping .*c02/00007\.jpg"):
        seen = torch.cat([y for _, y in _loader(ds, 16, workers)])
    assert len(seen) == 99 and next(iter(ds.bad.values())).startswith(str(bad))
    assert torch.bincount(seen).tolist() == [25, 25, 24, 25]
    # the next epoch meets it again: still one bad file, no new warning needed to count it
    assert len(torch.cat([y for _, y in _loader(ds, 16, workers)])) == 99 and len(ds.bad) == 1
    # a second one is past 1% of 100 files: the epoch stops with an error naming the count
    (tmp_path / "data" / "c03" / "00001.jpg").write_bytes(b"")
    ds = load_image_folder(tmp_path / "data", size=8)
    with (
        pytest.raises(UserError, match=r"2 of 100 images are unreadable"),
        pytest.warns(UserWarning),
    ):
        for _ in _loader(ds, 16, workers):
            pass


def test_worker_processes_give_the_same_batches(tmp_path):
    _folder(tmp_path / "data", per_class=12, classes=3)
    ds = load_image_folder(tmp_path / "data", size=8)
    kw = dict(shuffle=True, drop_last=True, augment=Augment(flip=True, scale_aspect=True))
    inline = list(_loader(ds, 8, 0, **kw))
    spread = list(_loader(ds, 8, 2, **kw))
    assert len(inline) == len(spread) == 4
    for (xa, ya), (xb, yb) in zip(inline, spread, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
