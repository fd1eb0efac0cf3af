"""Malformed input, fuzzed with hypothesis: recipe TOML and --set values, image files, CIFAR
batch files and archives, checkpoints. The rules, the same everywhere:

- `predict` names every unreadable file on stderr, predicts the rest, exits 1 if any failed;
- every other bad input is a one-line error naming the file or value, exit 2;
- never a traceback, a hang or a memory blow-up.

Examples per test are capped (GOOGLENET_FUZZ_EXAMPLES, default below) and derandomized, so CI
runs the same cases in a few seconds; raise the variable for a longer hunt.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from googlenet import cli
from googlenet.errors import UserError
from googlenet.training import config
from googlenet.training import loop as engine
from googlenet.training.config import FIELD_TYPES, list_recipes, recipe_values, resolve_config

EXAMPLES = os.environ.get("GOOGLENET_FUZZ_EXAMPLES")


def fuzz(n: int) -> settings:
    """n examples (GOOGLENET_FUZZ_EXAMPLES overrides), the same ones every run unless
    GOOGLENET_FUZZ_RANDOM is set."""
    return settings(
        max_examples=int(EXAMPLES) if EXAMPLES else n,
        deadline=None,
        database=None,
        derandomize=os.environ.get("GOOGLENET_FUZZ_RANDOM") is None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


FUZZ = fuzz(40)  # cheap cases: configs, CIFAR files
FUZZ_SLOW = fuzz(10)  # each runs a model: predict, checkpoints
RECIPES_DIR = Path(config.__file__).parent / "recipes"


def one_line_error(err: str, command: str) -> str:
    """The CLI's stderr for a refused input: exactly one error line (notes aside), no
    traceback."""
    lines = [x for x in err.strip().splitlines() if not x.startswith(f"googlenet {command}: note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"googlenet {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def mutate(data: bytes, draw) -> bytes:
    """A few random byte edits (flip, insert, delete, truncate) of `data`."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord('"'), ord("=")]))
    return bytes(buf)


# --- configs: recipe TOML and --set ------------------------------------------------------------

_SET_VALUES = st.one_of(
    st.text(max_size=24),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["true", "nan", "inf", "-inf", "1e400", "-1", "0", "1.5", "[1, 2]", "{a = 1}",
         '"quoted"', "0x10", "1_000", "2026-01-01", "'''x'''", "1\nepochs = 2", ""]
    ),
)  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    """cli train up to the config, without training: the config is what is fuzzed here."""
    seen = []

    def fake_train(cfg, **kwargs):
        seen.append(cfg)
        return engine.RunResult(out=Path(cfg.out or "x"), epochs=0, metrics={}, best_acc=-1,
                                best_epoch=0)  # fmt: skip

    monkeypatch.setattr(engine, "train", fake_train)
    return seen


@FUZZ
@given(key=st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.text(max_size=8)), value=_SET_VALUES)
def test_set_values_are_accepted_or_refused_in_one_line(key, value, capsys, no_training):
    text = f"{key}={value}"
    code = cli.main(["train", "--set", text, "--out", "unused-run-folder"])
    captured = capsys.readouterr()
    if code == 0:
        cfg = no_training.pop()
        assert cfg.validate() is cfg  # what passed is a valid config
    else:
        assert code == 2
        one_line_error(captured.err, "train")


@FUZZ
@given(data=st.data())
def test_mutated_recipe_files_are_accepted_or_refused_in_one_line(
    data, tmp_path, capsys, no_training
):
    name = data.draw(st.sampled_from(list_recipes()))
    raw = (RECIPES_DIR / f"{name}.toml").read_bytes()
    path = tmp_path / "my config.toml"
    path.write_bytes(mutate(f'recipe = "{name}"\n'.encode() + raw, data.draw))
    code = cli.main(["train", "--config", str(path)])
    captured = capsys.readouterr()
    if code == 0:
        no_training.pop().validate()
    else:
        assert code == 2
        line = one_line_error(captured.err, "train")
        assert "my config.toml" in line or "recipe" in line or "config key" in line


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_random_config_files_are_refused_in_one_line(raw, tmp_path, capsys, no_training):
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    code = cli.main(["train", "--config", str(path)])
    captured = capsys.readouterr()
    if code == 0:  # e.g. an empty file: the default recipe
        no_training.pop().validate()
    else:
        assert code == 2
        one_line_error(captured.err, "train")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("dropout=1.5", r"'dropout': must be in \[0, 1\)"),
        ("aux_dropout=1", r"'aux_dropout': must be in \[0, 1\)"),
        ("lr=-0.1", "'lr': must be a positive number"),
        ("lr=nan", "'lr': must be a finite number"),
        ("weight_decay=inf", "'weight_decay': must be a finite number"),
        ("seed=-3", "'seed': must be in"),
        ("checkpoint_every_s=-1", "'checkpoint_every_s': must be >= 0"),
        ("recipe=../../etc", "is not a recipe name"),
        ("batch_size=1.5", "'batch_size': expected int"),
    ],
)
def test_out_of_range_values_are_one_line_errors(setting, message, capsys, no_training):
    assert cli.main(["train", "--set", setting]) == 2
    assert not no_training
    line = one_line_error(capsys.readouterr().err, "train")
    assert pytest.importorskip("re").search(message, line), line


def test_unknown_base_recipe_in_a_config_file_is_refused(tmp_path, capsys, no_training):
    path = tmp_path / "mine.toml"
    path.write_text('recipe = "cifar10-fastt"\nepochs = 1\n')
    assert cli.main(["train", "--config", str(path)]) == 2
    line = one_line_error(capsys.readouterr().err, "train")
    assert "mine.toml" in line and "unknown base recipe 'cifar10-fastt'" in line
    path.write_bytes(b"epochs = 1\n# caf\xe9\n")  # Latin-1, not UTF-8
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "not a UTF-8 text file" in one_line_error(capsys.readouterr().err, "train")


def test_shipped_recipes_resolve():
    for name in list_recipes():
        assert recipe_values(name) and resolve_config(name).recipe == name
    with pytest.raises(UserError, match="unknown recipe"):
        resolve_config("../pyproject")


# --- image files: predict ----------------------------------------------------------------------


def _png(seed: int, size: int = 12) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 12) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    from tests.conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.safetensors", input_size=16)


@pytest.fixture
def loaded_once(monkeypatch, small_ckpt):
    """`googlenet predict` with the checkpoint loaded once for all examples (the CLI path is
    the same; loading is fuzzed on its own below)."""
    from googlenet.infer import inference

    predictor = inference.load(small_ckpt)
    monkeypatch.setattr(inference, "load", lambda *a, **k: predictor)
    return small_ckpt


@FUZZ_SLOW
@given(data=st.data())
def test_predict_names_every_unreadable_file_and_predicts_the_rest(
    data, tmp_path, capsys, loaded_once
):
    small_ckpt = loaded_once
    folder = tmp_path / "pics"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(exist_ok=True)
    good = {"good a.png": _png(1), "good b.jpg": _jpeg(2)}
    n_bad = data.draw(st.integers(1, 4))
    files = dict(good)
    for j in range(n_bad):
        base = data.draw(st.sampled_from([_png(3), _jpeg(4), b""]))
        raw = data.draw(st.one_of(st.binary(max_size=300), st.just(base).map(bytes)))
        files[f"file {j}.{data.draw(st.sampled_from(['png', 'jpg', 'gif', 'bin']))}"] = (
            mutate(raw, data.draw) if raw else raw
        )
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    code = cli.main(["predict", str(small_ckpt), str(folder), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    predicted = {Path(line.split("\t")[0]).name for line in out.splitlines()}
    failed = {name for name in files if f"{folder / name}: " in err}
    assert set(good) <= predicted
    assert predicted | failed == set(files) and not predicted & failed, (out, err)
    assert code == (1 if failed else 0)
    if failed:
        assert f"{len(failed)} file(s) could not be read" in err


def test_decompression_bomb_is_refused_by_name(tmp_path, capsys, loaded_once):
    small_ckpt = loaded_once
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    # A 40,000 x 40,000 RGB PNG header (4.8 GB decoded) with a few KB of compressed zeros.
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 2_000_000, 9)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    assert len(bomb) < 10_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "fine.png").write_bytes(_png(0))
    code = cli.main(
        ["predict", str(small_ckpt), str(tmp_path / "bomb.png"), str(tmp_path / "fine.png")]
    )
    out, err = capsys.readouterr()
    assert code == 1 and "fine.png" in out
    assert f"{tmp_path / 'bomb.png'}: " in err and "decompression bomb" in err


# --- CIFAR batch files and archives ------------------------------------------------------------


def _cifar_bin(n: int, seed: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    return np.concatenate(
        [y[:, None], rng.integers(0, 256, (n, 3072), dtype=np.uint8)], 1
    ).tobytes()


def _cifar_py(n: int, seed: int) -> bytes:
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"batch_label": b"testing batch 1 of 1",
    }
    return pickle.dumps(batch, protocol=2)


CLASSES10 = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar(root: Path, kind: str, test_bytes: bytes | None = None) -> Path:
    """A small CIFAR-10 tree in the binary or python layout; test_bytes replaces test_batch."""
    import pickle
    import shutil

    folder = root / ("cifar-10-batches-bin" if kind == "bin" else "cifar-10-batches-py")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    make = _cifar_bin if kind == "bin" else _cifar_py
    suffix = ".bin" if kind == "bin" else ""
    for i in range(1, 6):
        (folder / f"data_batch_{i}{suffix}").write_bytes(make(2, i))
    (folder / f"test_batch{suffix}").write_bytes(
        test_bytes if test_bytes is not None else make(4, 0)
    )
    if kind == "bin":
        (folder / "batches.meta.txt").write_text("\n".join(CLASSES10) + "\n")
    else:
        meta = {b"label_names": [c.encode() for c in CLASSES10], b"num_cases_per_batch": 2}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@FUZZ
@given(data=st.data())
def test_mutated_cifar_batches_load_or_fail_in_one_line(data, tmp_path):
    from googlenet.data import load_cifar

    kind = data.draw(st.sampled_from(["bin", "py"]))
    valid = _cifar_bin(4, 0) if kind == "bin" else _cifar_py(4, 0)
    raw = data.draw(
        st.one_of(st.binary(max_size=400), st.just(valid).map(lambda b: mutate(b, data.draw)))
    )
    write_cifar(tmp_path, kind, raw)
    try:
        ds = load_cifar(tmp_path, "cifar10", "test")
    except UserError as e:
        assert "\n" not in str(e) and "test_batch" in str(e), e
    else:
        assert ds.images.shape[1:] == (3, 32, 32) and int(ds.labels.max()) < 10


def _cifar_py_archive() -> bytes:
    """A small cifar-10-python.tar.gz, byte-for-byte the same every time (fixed mtimes)."""
    import gzip
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_cifar(Path(tmp), "py")
        buf = io.BytesIO()
        with (
            gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w") as tar,
        ):
            for f in sorted(folder.iterdir()):
                info = tarfile.TarInfo(f"cifar-10-batches-py/{f.name}")
                info.size, info.mtime = f.stat().st_size, 0
                tar.addfile(info, io.BytesIO(f.read_bytes()))
        return buf.getvalue()


ARCHIVE = _cifar_py_archive()


@FUZZ
@given(data=st.data())
def test_mutated_cifar_archives_load_or_fail_in_one_line(data, tmp_path):
    from googlenet.data import load_cifar

    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(mutate(ARCHIVE, data.draw))
    try:
        ds = load_cifar(root, "cifar10", data.draw(st.sampled_from(["train", "test"])))
    except UserError as e:
        assert "\n" not in str(e) and "cifar-10-python.tar.gz" in str(e), e
    else:  # a mutation it accepts must still give a well-formed data set
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32)
        assert len(ds.labels) == len(ds.images) and int(ds.labels.max()) < 10
        assert len(ds.classes) == 10


def test_cifar_archive_with_a_huge_member_is_refused_without_reading_it(tmp_path):
    import tarfile

    from googlenet.data import load_cifar

    folder = write_cifar(tmp_path / "src", "py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_9")
        info.size = 2**40  # claims a terabyte; the archive ends long before
        tar.addfile(info)  # the header only
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_cifar(tmp_path, "cifar10", "test")


def test_cli_reports_a_bad_cifar_test_batch_in_one_line(tmp_path, capsys):
    from tests.conftest import make_checkpoint

    small_ckpt = make_checkpoint(tmp_path / "c.safetensors", classes=CLASSES10, dataset="cifar10")
    write_cifar(tmp_path, "bin", _cifar_bin(4, 0)[:-7])  # cut short
    code = cli.main(
        ["evaluate", str(small_ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    line = one_line_error(capsys.readouterr().err, "evaluate")
    assert code == 2 and "test_batch.bin" in line and "not a whole number" in line


# --- checkpoints -------------------------------------------------------------------------------


def _with_header(raw: bytes, header: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def _predict_ckpt(path: Path, image: Path, capsys) -> tuple[int, str]:
    code = cli.main(["predict", str(path), str(image)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "x.png"
    p.write_bytes(_png(5))
    return p


@FUZZ_SLOW
@given(data=st.data())
def test_corrupted_checkpoints_fail_in_one_line_naming_the_file(
    data, tmp_path, capsys, small_ckpt, image_file
):
    import json

    raw = small_ckpt.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    how = data.draw(st.sampled_from(["bytes", "header", "length", "utf8", "json"]))
    if how == "bytes":  # anywhere, mostly in the tensor data (caught by the SHA-256)
        bad = mutate(raw, data.draw)
    elif how == "header":
        bad = _with_header(raw, mutate(header, data.draw))
    elif how == "length":
        length = data.draw(
            st.sampled_from([0, 1, 7, n - 1, n + 1, len(raw), 2**31, 2**63, 2**64 - 1])
        )
        bad = length.to_bytes(8, "little") + raw[8:]
    elif how == "utf8":
        bad = _with_header(raw, header[:20] + b"\xff\xfe\xc3" + header[23:])
    else:  # valid JSON, wrong values in the googlenet metadata
        obj = json.loads(header)
        meta = json.loads(obj["__metadata__"]["googlenet"])
        key = data.draw(st.sampled_from(sorted(meta)))
        json_values = st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=5),
            lambda kids: (
                st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
            ),
            max_leaves=6,
        )
        meta[key] = data.draw(json_values)
        obj["__metadata__"]["googlenet"] = json.dumps(meta)
        bad = _with_header(raw, json.dumps(obj).encode())
    path = tmp_path / "bad ckpt.safetensors"
    path.write_bytes(bad)
    code, err = _predict_ckpt(path, image_file, capsys)
    if code != 0:  # e.g. a mutated class name still loads
        line = one_line_error(err, "predict")
        assert "bad ckpt.safetensors" in line, line
        assert code == 2


@pytest.mark.parametrize("change", ["dtype", "shape", "missing"])
def test_checkpoints_with_wrong_tensors_fail_in_one_line(
    change, tmp_path, capsys, small_ckpt, image_file
):
    import torch
    from safetensors.torch import load, save

    raw = small_ckpt.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    import json

    metadata = json.loads(raw[8 : 8 + n])["__metadata__"]
    tensors = load(raw)
    key = "model/fc.weight"
    if change == "dtype":
        tensors[key] = tensors[key].to(torch.int64)
    elif change == "shape":
        tensors[key] = tensors[key][:, :-1].contiguous()
    else:
        del tensors[key]
    metadata.pop("googlenet-sha256", None)  # re-written without a checksum (an older writer)
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(save(tensors, metadata=metadata))
    code, err = _predict_ckpt(path, image_file, capsys)
    line = one_line_error(err, "predict")
    assert code == 2 and "wrong.safetensors" in line and "fc.weight" in line
