"""The data layer: CIFAR layouts and archives, the restricted unpickler, image folders, the batch
pipeline (augmentation, resize, determinism, sharding) and the download path (local server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from googlenet.data import (
    ARCHIVES,
    ArrayDataset,
    ImageFolderDataset,
    load_cifar,
    load_image_folder,
    resolve_data_root,
    restricted_loads,
)
from googlenet.data.augment import Augment
from googlenet.data.loader import BatchLoader
from googlenet.errors import UserError
from googlenet.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Preprocess,
    read_image,
    resample_matrix,
)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean/std that leave pixels on the 0..1 scale


# --- synthetic CIFAR files in the official formats ---------------------------------------------


def _synthetic(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    images[:, 0] = labels  # first red pixel encodes the label, to check alignment
    return images, labels


def _write_cifar(root: Path, name: str, kind: str, n: int = 6) -> dict[str, np.ndarray]:
    """Writes a tiny data set in the official layout; returns the train/test arrays."""
    n_classes = 10 if name == "cifar10" else 100
    classes = [f"class{i}" for i in range(n_classes)]
    folder = {
        ("cifar10", "bin"): "cifar-10-batches-bin",
        ("cifar10", "py"): "cifar-10-batches-py",
        ("cifar100", "bin"): "cifar-100-binary",
        ("cifar100", "py"): "cifar-100-python",
    }[name, kind]
    d = root / folder
    d.mkdir(parents=True)
    if name == "cifar10":
        files = {f"data_batch_{i}": (n, i) for i in range(1, 6)} | {"test_batch": (n, 9)}
    else:
        files = {"train": (n * 5, 1), "test": (n, 9)}
    arrays: dict[str, list] = {"train": [], "test": []}
    for fname, (count, seed) in files.items():
        images, labels = _synthetic(count, n_classes, seed)
        arrays["test" if "test" in fname else "train"].append((images, labels))
        if kind == "bin":
            lab = labels.astype(np.uint8)[:, None]
            if name == "cifar100":  # coarse label byte first, then fine
                lab = np.concatenate([(lab // 5).astype(np.uint8), lab], 1)
            (d / f"{fname}.bin").write_bytes(np.concatenate([lab, images], 1).tobytes())
        else:
            key = "labels" if name == "cifar10" else "fine_labels"
            batch = {b"data": images, key.encode(): labels.tolist(), b"batch_label": b"x"}
            (d / fname).write_bytes(pickle.dumps(batch, protocol=4))
    if kind == "bin":
        meta = "batches.meta.txt" if name == "cifar10" else "fine_label_names.txt"
        (d / meta).write_text("\n".join(classes) + "\n")
    elif name == "cifar10":
        (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": classes}, protocol=4))
    else:
        meta = {b"fine_label_names": classes, b"coarse_label_names": classes[:20]}
        (d / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return {
        s: (np.concatenate([a[0] for a in v]), np.concatenate([a[1] for a in v]))
        for s, v in arrays.items()
    }


def _tar_folder(root: Path, folder: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / folder, arcname=folder)


_ARCHIVE = {
    ("cifar10", "bin"): ("cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
    ("cifar10", "py"): ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ("cifar100", "bin"): ("cifar-100-binary", "cifar-100-binary.tar.gz"),
    ("cifar100", "py"): ("cifar-100-python", "cifar-100-python.tar.gz"),
}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("kind", ["bin", "py"])
@pytest.mark.parametrize("archived", [False, True])
def test_cifar_layouts_and_archives(tmp_path, name, kind, archived):
    src = tmp_path / "src"
    expected = _write_cifar(src, name, kind)
    root = src
    if archived:  # only the official .tar.gz, read in place
        folder, archive = _ARCHIVE[name, kind]
        root = tmp_path / "arch"
        root.mkdir()
        _tar_folder(src, folder, root / archive)
    for split in ("train", "test"):
        ds = load_cifar(root, name, split)
        images, labels = expected[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert torch.equal(ds.images.reshape(len(labels), -1), torch.from_numpy(images))
        assert ds.classes[:3] == ["class0", "class1", "class2"]
        assert len(ds.classes) == (10 if name == "cifar10" else 100)
    if archived:
        assert not (root / _ARCHIVE[name, kind][0]).exists()  # read, not extracted


def test_cifar_planes_are_rgb(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rec = np.zeros((1, 3073), np.uint8)
    rec[0, 0] = 7
    rec[0, 1 : 1 + 1024] = 10  # R plane
    rec[0, 1 + 1024 : 1 + 2048] = 20  # G plane
    rec[0, 1 + 2048 + 33] = 30  # B plane, row 1 column 1
    for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (d / f).write_bytes(rec.tobytes())
    (d / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    ds = load_cifar(tmp_path, "cifar10", "test")
    assert ds.labels.tolist() == [7]
    assert ds.images[0, 0].unique().tolist() == [10]
    assert ds.images[0, 1].unique().tolist() == [20]
    assert ds.images[0, 2, 1, 1] == 30 and ds.images[0, 2].sum() == 30


def test_truncated_and_corrupt_batches_name_the_file(tmp_path):
    _write_cifar(tmp_path / "a", "cifar10", "bin")
    bad = tmp_path / "a" / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"data_batch_3\.bin.*truncated"):
        load_cifar(tmp_path / "a", "cifar10", "train")

    _write_cifar(tmp_path / "b", "cifar100", "py")
    bad = tmp_path / "b" / "cifar-100-python" / "test"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(UserError, match=r"cifar-100-python[/\\]test"):
        load_cifar(tmp_path / "b", "cifar100", "test")

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cifar-10-python.tar.gz").write_bytes(b"not a tar at all")
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz"):
        load_cifar(tmp_path / "c", "cifar10", "test")


def test_missing_data_says_where_to_put_what(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path.name) + r".*put cifar-100-python\.tar\.gz"):
        load_cifar(tmp_path, "cifar100", "train")
    with pytest.raises(UserError, match="unknown CIFAR"):
        load_cifar(tmp_path, "cifar20")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker)}, protocol=2)
    with pytest.raises(UserError, match=r"evil\.bin.*(system|refusing)"):
        restricted_loads(payload, "evil.bin")
    assert not marker.exists()
    # What the real batches hold still loads.
    ok = restricted_loads(pickle.dumps({b"data": np.arange(4, dtype=np.uint8)}, protocol=4), "x")
    assert ok[b"data"].tolist() == [0, 1, 2, 3]


def test_restricted_unpickler_accepts_the_legacy_numpy_module_name():
    # The official batches were pickled by numpy 1.x: numpy.core.multiarray._reconstruct.
    p = pickle.dumps({b"data": np.arange(6, dtype=np.uint8), b"labels": [1, 2]}, protocol=4)
    assert p[2:3] == b"\x95"  # FRAME opcode: its length shrinks by the one byte we remove
    size = struct.unpack("<Q", p[3:11])[0]
    new, old = b"\x8c\x15numpy.core.multiarray", b"\x8c\x16numpy._core.multiarray"
    assert old in p
    legacy = p[:3] + struct.pack("<Q", size - 1) + p[11:].replace(old, new)
    assert restricted_loads(legacy, "x")[b"data"].tolist() == [0, 1, 2, 3, 4, 5]


def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLENET_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("GOOGLENET_DATA")
    assert resolve_data_root(None) == Path("data")


@pytest.mark.cifar
def test_real_cifar10(cifar_root):
    train = load_cifar(cifar_root, "cifar10", "train")
    test = load_cifar(cifar_root, "cifar10", "test")
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels.bincount().tolist() == [5000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    mean = train.images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=0.002)
    x, y = next(
        iter(
            BatchLoader(
                test.subset(64), 64, preprocess=Preprocess(224, CIFAR10_MEAN, CIFAR10_STD, 224)
            )
        )
    )
    assert x.shape == (64, 3, 224, 224) and torch.equal(y, test.labels[:64])


# --- the batch pipeline ------------------------------------------------------------------------


def _label_coded(n: int = 40, side: int = 32) -> ArrayDataset:
    """Constant images whose value encodes the label (value = 5 * label + 10)."""
    labels = torch.arange(n) % 37
    images = (labels * 5 + 10).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, side, side)
    return ArrayDataset(images.contiguous(), labels, [str(i) for i in range(37)])


@pytest.mark.parametrize(
    "augment, size",
    [
        (Augment(crop_padding=4, flip=True, padding_mode="reflect"), 32),
        (Augment(crop_padding=4, flip=True, padding_mode="reflect"), 96),
        (Augment(flip=True, scale_aspect=True), 64),
        (Augment(flip=True, scale_aspect=True), 16),
    ],
)
def test_augmentation_keeps_labels_aligned(augment, size):
    ds = _label_coded()
    loader = BatchLoader(
        ds, 8, preprocess=Preprocess(size, ZERO, ONE), augment=augment, shuffle=True, seed=3
    )
    seen = 0
    for x, y in loader:
        assert x.shape == (len(y), 3, size, size) and x.dtype == torch.float32
        expected = (y * 5 + 10).float() / 255
        assert torch.allclose(x.mean((1, 2, 3)), expected, atol=1e-5)
        assert torch.allclose(x.amin((1, 2, 3)), expected, atol=1e-5)
        seen += len(y)
    assert seen == len(ds)


def test_crop_and_flip_are_windows_of_the_padded_image():
    torch.manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8), torch.arange(12))
    loader = BatchLoader(
        ds,
        12,
        preprocess=Preprocess(8, ZERO, ONE),
        augment=Augment(crop_padding=2, flip=True),
        shuffle=False,
    )
    x, _ = next(iter(loader))
    padded = F.pad(ds.images.float() / 255, (2, 2, 2, 2))
    flips, shifts = 0, set()
    for i in range(12):
        match = []
        for oy in range(5):
            for ox in range(5):
                window = padded[i, :, oy : oy + 8, ox : ox + 8]
                match += [
                    (oy, ox, f)
                    for f in (False, True)
                    if torch.allclose(window.flip(2) if f else window, x[i])
                ]
        assert match, f"sample {i} is not a (flipped) window of its padded image"
        flips += match[0][2]
        shifts.add(match[0][:2])
    assert 0 < flips < 12 and len(shifts) > 1  # both flips happen; offsets vary


def test_resize_matches_interpolate_and_normalises():
    ds = ArrayDataset(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    ref = ds.images.float() / 255
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    for size, channels_last in ((32, False), (80, True), (80, False)):
        # The training path (an augmentation with nothing random) resizes in float.
        pp = Preprocess(size, CIFAR10_MEAN, CIFAR10_STD)
        loader = BatchLoader(ds, 4, preprocess=pp, augment=Augment(), channels_last=channels_last)
        x, _ = next(iter(loader))
        want = F.interpolate(ref, size=(size, size), mode="bilinear")
        assert torch.allclose(x, (want - mean) / std, atol=1e-4)
        assert x.is_contiguous(memory_format=torch.channels_last) == (channels_last and size > 1)
    # Shrinking (a large scale_aspect crop) is antialiased like F.interpolate(antialias=True).
    w = resample_matrix(torch.zeros(4), torch.full((4,), 32.0), 32, 20)
    shrunk = torch.matmul(torch.matmul(w[:, None], ref), w[:, None].transpose(2, 3))
    want = F.interpolate(ref, size=(20, 20), mode="bilinear", antialias=True)
    assert torch.allclose(shrunk, want, atol=1e-5)


def test_larger_source_is_cropped_to_the_input():
    ds = ArrayDataset(torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8), torch.arange(6))
    x, _ = next(iter(BatchLoader(ds, 6, preprocess=Preprocess(8, ZERO, ONE))))
    assert torch.allclose(x, ds.images[:, :, 2:10, 2:10].float() / 255)  # centre crop
    loader = BatchLoader(ds, 6, preprocess=Preprocess(8, ZERO, ONE), augment=Augment(), seed=4)
    x, _ = next(iter(loader))
    src = ds.images.float() / 255
    offsets = set()
    for i in range(6):
        hits = [
            (oy, ox)
            for oy in range(5)
            for ox in range(5)
            if torch.allclose(x[i], src[i, :, oy : oy + 8, ox : ox + 8])
        ]
        assert hits, f"sample {i} is not an 8 x 8 window of its image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # random positions when augmenting


def test_photometric_and_cutout():
    ds = ArrayDataset(torch.full((16, 3, 32, 32), 128, dtype=torch.uint8), torch.zeros(16))
    plain = BatchLoader(ds, 16, preprocess=Preprocess(32, ZERO, ONE))
    photo = BatchLoader(
        ds, 16, preprocess=Preprocess(32, ZERO, ONE), augment=Augment(photometric=True)
    )
    x0, _ = next(iter(plain))
    x1, _ = next(iter(photo))
    assert x1.min() >= 0 and x1.max() <= 1
    per_image = x1.mean((1, 2, 3))
    assert not torch.allclose(x1, x0) and per_image.std() > 0.01  # per-image jitter differs
    cut = BatchLoader(ds, 16, preprocess=Preprocess(32, ZERO, ONE), augment=Augment(cutout=8))
    x2, _ = next(iter(cut))
    zeros = (x2 == 0).all(1).sum((1, 2))  # cutout fills with the mean = 0 after normalising
    assert (zeros > 0).all() and (zeros <= 64).all() and (zeros == 64).any()


def test_same_seed_same_batches_and_epochs_differ():
    ds = _label_coded(50)
    aug = Augment(crop_padding=4, flip=True, scale_aspect=False, photometric=True)

    def run(epoch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = BatchLoader(
            ds, 16, preprocess=Preprocess(32, ZERO, ONE), augment=aug, shuffle=True, seed=seed
        )
        loader.set_epoch(epoch)
        return list(loader)

    a, b = run(0), run(0)
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    c = run(1)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    d = run(0, seed=2)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in d]))


@pytest.mark.parametrize("shuffle, drop_last", [(True, True), (True, False), (False, False)])
def test_shards_partition_an_epoch(shuffle, drop_last):
    n, world = 103, 4
    ds = ArrayDataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n))
    per_rank = []
    for rank in range(world):
        loader = BatchLoader(
            ds,
            5,
            preprocess=Preprocess(4, ZERO, ONE),
            shuffle=shuffle,
            drop_last=drop_last,
            seed=7,
            rank=rank,
            world_size=world,
        )
        loader.set_epoch(2)
        ys = [y for _, y in loader]
        assert len(ys) == len(loader)
        per_rank.append(torch.cat(ys))
    seen = torch.cat(per_rank)
    assert len(seen.unique()) == len(seen)  # disjoint
    if drop_last:  # equal batch counts, full batches only
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == 25
    else:  # every sample exactly once across ranks
        assert sorted(seen.tolist()) == list(range(n))


def test_loader_rejects_bad_arguments():
    ds = _label_coded(4)
    with pytest.raises(UserError, match="rank"):
        BatchLoader(ds, 2, preprocess=Preprocess(32, ZERO, ONE), rank=2, world_size=2)
    with pytest.raises(UserError, match="batch size"):
        BatchLoader(ds, 0, preprocess=Preprocess(32, ZERO, ONE))
    with pytest.raises(UserError, match="padding_mode"):
        Augment(padding_mode="wrap")


def test_subset():
    ds = _label_coded(10)
    assert len(ds.subset(3)) == 3 and ds.subset(3).labels.tolist() == [0, 1, 2]
    assert ds.subset([9, 1]).labels.tolist() == [9, 1]
    with pytest.raises(UserError):
        ds.subset([10])


# --- image files and folders -------------------------------------------------------------------


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _make_folder(root: Path) -> dict[str, Path]:
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    files = {
        "cmyk": root / "cats" / "cmyk.jpg",
        "png16": root / "cats" / "grey16.png",
        "rgba": root / "dogs" / "rgba.png",
        "rgb": root / "dogs" / "big.jpg",
        "corrupt": root / "dogs" / "corrupt.jpg",
        "text": root / "cats" / "notes.txt",
    }
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(files["cmyk"])  # red
    grey = np.full((24, 36), 65535, np.uint16)
    Image.fromarray(grey).save(files["png16"])  # 16-bit grey, white
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(files["rgba"])
    files["rgb"].write_bytes(_jpeg_bytes(Image.new("RGB", (300, 200), (0, 255, 0))))
    files["corrupt"].write_bytes(_jpeg_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:300])
    files["text"].write_text("not an image\n")
    return files


def test_image_folder_bad_files(tmp_path):
    files = _make_folder(tmp_path)
    # 2 of 6 files unreadable: past the default 1%, named in the error (and each warned)
    with (
        pytest.raises(UserError, match=r"2 of 6 images are unreadable.*(corrupt\.jpg|notes\.txt)"),
        pytest.warns(UserWarning, match="skipping"),
    ):
        load_image_folder(tmp_path, size=16, in_memory=True)
    with pytest.warns(UserWarning) as caught:
        ds = load_image_folder(tmp_path, size=16, max_bad=0.5, in_memory=True)
    messages = " ".join(str(w.message) for w in caught)
    assert str(files["corrupt"]) in messages and str(files["text"]) in messages
    assert isinstance(ds, ArrayDataset) and ds.classes == ["cats", "dogs"]
    assert ds.images.shape == (4, 3, 16, 16) and ds.labels.tolist() == [0, 0, 1, 1]
    centre = ds.images[:, :, 8, 8].int()
    # cmyk (red), 16-bit grey (white), big.jpg (green), rgba (blue); sorted by path per class.
    want = torch.tensor([[255, 0, 0], [255, 255, 255], [0, 255, 0], [0, 0, 255]])
    assert (centre - want).abs().max() <= 3


def test_read_image_modes_and_errors(tmp_path):
    files = _make_folder(tmp_path)
    assert read_image(files["png16"]).shape == (3, 24, 36)
    assert read_image(files["png16"]).unique().tolist() == [255]
    rgba = read_image(files["rgba"])
    assert rgba.shape == (3, 20, 20) and rgba[:, 0, 0].tolist() == [0, 0, 255]
    half = tmp_path / "half.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(half)
    assert read_image(half).unique().tolist() == [128]
    translucent = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(translucent)
    assert read_image(translucent).unique().tolist() == [255]  # composited onto white
    pal = tmp_path / "p.gif"
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("P").save(pal)
    assert read_image(pal)[:, 0, 0].tolist() == [255, 0, 0]
    for bad in (files["corrupt"], files["text"], tmp_path / "missing.png"):
        with pytest.raises(UserError, match=bad.name):
            read_image(bad)


def test_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    path.write_bytes(_jpeg_bytes(im, exif=exif))
    x = read_image(path)
    assert x.shape == (3, 40, 20)  # upright: taller than wide
    assert x[:, :5].float().mean() > 200 and x[:, -5:].float().mean() < 50  # stripe now on top


def test_image_folder_streams_splits_and_feeds_the_loader(tmp_path):
    for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (30 + i, 20), colour).save(tmp_path / c / f"{i}.png")
    train = load_image_folder(tmp_path, size=12, split="train", val_fraction=0.2, seed=1)
    val = load_image_folder(tmp_path, size=12, split="val", val_fraction=0.2, seed=1)
    assert isinstance(train, ImageFolderDataset) and len(train) == 16 and len(val) == 4
    assert set(train.paths).isdisjoint(val.paths) and val.labels.tolist() == [0, 0, 1, 1]
    again = load_image_folder(tmp_path, size=12, split="val", val_fraction=0.2, seed=1)
    assert again.paths == val.paths
    loader = BatchLoader(
        train,
        6,
        preprocess=Preprocess(24, ZERO, ONE),
        augment=Augment(flip=True, scale_aspect=True),
        shuffle=True,
    )
    n = 0
    for x, y in loader:
        assert x.shape == (len(y), 3, 24, 24)
        red = x[:, 0].mean((1, 2)) > 0.9
        assert torch.equal(red, y == 0)  # class a is red, class b blue
        n += len(y)
    assert n == 16


# --- download (local server only) --------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A tiny cifar-10-python.tar.gz served on 127.0.0.1; yields (url, md5)."""
    src = tmp_path / "src"
    _write_cifar(src, "cifar10", "py", n=3)
    www = tmp_path / "www"
    www.mkdir()
    _tar_folder(src, "cifar-10-batches-py", www / "cifar-10-python.tar.gz")
    md5 = hashlib.md5((www / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", md5
    server.shutdown()
    server.server_close()


def test_download_from_local_server(tmp_path, served, monkeypatch):
    url, md5 = served
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=url, md5=md5))
    root = tmp_path / "data"
    ds = load_cifar(root, "cifar10", "test", download=True)
    assert len(ds) == 3 and ds.classes[1] == "class1"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no leftovers


def test_download_bad_checksum_leaves_nothing(tmp_path, served, monkeypatch):
    url, _ = served
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=url, md5="0" * 32))
    root = tmp_path / "data"
    with pytest.raises(UserError, match="MD5"):
        load_cifar(root, "cifar10", "train", download=True)
    assert list(root.iterdir()) == []
    with pytest.raises(UserError, match="not found"):  # and it does not pass for a data set
        load_cifar(root, "cifar10", "train")


def test_download_without_network_says_where_to_put_files(tmp_path, monkeypatch):
    s = socket.socket()  # a 127.0.0.1 port with nothing listening on it
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=url, md5="0" * 32))
    with pytest.raises(UserError, match=r"put cifar-10-python\.tar\.gz.*into"):
        load_cifar(tmp_path, "cifar10", "train", download=True)
    assert [p for p in tmp_path.iterdir()] == []


def test_cli_download(tmp_path, served, monkeypatch, capsys):
    from googlenet.cli import main

    url, md5 = served
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=url, md5=md5))
    assert main(["download", "--data", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "cifar-10-batches-py" / "test_batch").is_file()
    monkeypatch.setitem(ARCHIVES, "cifar10", replace(ARCHIVES["cifar10"], url=url, md5="1" * 32))
    assert main(["download", "--data", str(tmp_path / "e")]) == 2
    assert "MD5" in capsys.readouterr().err


def test_data_config_takes_training_configs_and_recorded_dicts_alike():
    """DataConfig (data/ does not import training/) keeps TrainConfig's names and defaults, so
    a recorded config dict lacking newer keys means what the older run did."""
    from dataclasses import fields

    from googlenet.data.build import DataConfig
    from googlenet.training.config import TrainConfig, resolve_config

    defaults = TrainConfig()
    for f in fields(DataConfig):
        want = getattr(defaults, f.name)
        assert getattr(DataConfig(), f.name) == (tuple(want) if isinstance(want, list) else want)
    cfg = resolve_config(overrides=["holdout=40", "limit_val=7", "mean=[0.5,0.5,0.5]"])
    assert DataConfig.of(cfg) == DataConfig.of(cfg.to_dict()) == DataConfig.of(DataConfig.of(cfg))
    assert DataConfig.of(cfg).holdout == 40 and DataConfig.of({}).holdout == 0
