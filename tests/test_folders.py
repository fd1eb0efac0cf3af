"""Training on a folder of one's own images: labels from the training classes, val/ mapped by
name, whole images at the target scale, stratified limits, num_classes checked up front, and
`googlenet evaluate RUN` reproducing the run's own val_predictions.csv image for image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from googlenet.cli import main
from googlenet.data import list_image_folder, load_image_folder, map_classes, stratified_indices
from googlenet.errors import UserError
from googlenet.metrics import VAL_PREDICTIONS, read_predictions
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from tests.conftest import synth

COLOURS = {"airplane": (200, 40, 40), "automobile": (40, 200, 40), "bird": (40, 40, 200)}


def photo_folder(root: Path, split_classes: dict[str, list[str]], per_class: int = 3) -> Path:
    """root/<split>/<class>/*.png: noisy class-coloured photos of assorted non-square sizes."""
    rng = np.random.default_rng(0)
    for split, classes in split_classes.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = 40 + 9 * i, 57 + 5 * i
                arr = np.clip(rng.normal(COLOURS[c], 50, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}{i}.png")
    return root


def test_val_is_mapped_by_class_name_and_a_missing_class_warns(tmp_path):
    root = photo_folder(tmp_path, {"train": list(COLOURS), "val": ["automobile", "bird"]}, 2)
    classes = list_image_folder(root / "train")[2]
    with pytest.warns(UserWarning, match="airplane"):
        paths, labels, _ = list_image_folder(root / "val", classes)
    # automobile is class 1 of the training classes, not class 0 of val's own listing
    assert [p.parent.name for p in paths] == ["automobile"] * 2 + ["bird"] * 2
    assert labels.tolist() == [1, 1, 2, 2]


def test_a_val_class_unknown_to_training_is_an_error_naming_it(tmp_path):
    root = photo_folder(tmp_path, {"train": ["airplane", "bird"], "val": ["automobile", "bird"]})
    with pytest.raises(UserError, match="automobile.*not training classes"):
        load_image_folder(root / "val", size=32, classes=["airplane", "bird"])


def test_stratified_limits_keep_every_class(tmp_path):
    labels = torch.arange(3).repeat_interleave(torch.tensor([50, 30, 5]))  # sorted by class
    for n in (3, 10, 40):
        idx = stratified_indices(labels, n, seed=1)
        assert len(idx) == n and set(labels[idx].tolist()) == {0, 1, 2}
    assert torch.equal(stratified_indices(labels, 10, 1), stratified_indices(labels, 10, 1))
    assert not torch.equal(stratified_indices(labels, 10, 1), stratified_indices(labels, 10, 2))
    root = photo_folder(tmp_path, {"train": list(COLOURS)})
    ds = load_image_folder(root / "train", size=32, limit=3, seed=0)
    assert sorted(ds.labels.tolist()) == [0, 1, 2]  # not the first 3 files: one of each class


def test_images_are_prepared_whole_at_the_target_scale(tmp_path):
    root = photo_folder(tmp_path, {"train": ["airplane"]}, 1)
    ds = load_image_folder(root / "train", size=32, in_memory=True)
    # a 40 x 57 photo becomes 32 x 45 and its centre 32 x 32: nearly the whole image, not a
    # 32-pixel patch of it
    assert ds.images.shape == (1, 3, 32, 32)
    assert ds.prepared is not None and ds.prepared.resize == 32


def test_num_classes_too_small_is_a_one_line_error_before_training(tmp_path):
    cfg = resolve_config(overrides=[f"out={tmp_path / 'run'}", "num_classes=2", "input_size=16"])
    with pytest.raises(UserError, match=r"'num_classes': 2, but the training data has 4 classes"):
        train(cfg, train_set=synth(300, 0), val_set=synth(8, 1), progress=False)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def _train_and_evaluate(tmp_path: Path, capsys, *settings: str) -> list[dict]:
    root = photo_folder(tmp_path / "data", {"train": list(COLOURS), "val": list(COLOURS)}, 3)
    run = tmp_path / "run"
    args = ["train", "--quiet", "--data", str(root), "--out", str(run)]
    base = ("dataset=folder", "epochs=1", "batch_size=3", "aux_logits=false")
    for s in (*base, *settings):
        args += ["--set", s]
    assert main(args) == 0
    val = read_predictions(run / VAL_PREDICTIONS)
    assert len(val) == 9 and {Path(r["path"]).parent.name for r in val} == set(COLOURS)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    assert "n=9" in capsys.readouterr().out
    again = read_predictions(tmp_path / "eval" / "predictions.csv")
    assert [(r["path"], r["true"]) for r in again] == [(r["path"], r["true"]) for r in val]
    assert [r["predicted"] for r in again] == [r["predicted"] for r in val]
    probs = np.array([[float(r["probability"]) for r in rows] for rows in (val, again)])
    assert np.abs(probs[0] - probs[1]).max() < 1e-3
    return val


def test_folder_at_32_trains_from_the_cli_and_evaluate_reproduces_it(tmp_path, capsys):
    _train_and_evaluate(tmp_path, capsys, "variant=cifar", "input_size=32")


@pytest.mark.slow
def test_folder_at_224_trains_from_the_cli_and_evaluate_reproduces_it(tmp_path, capsys):
    _train_and_evaluate(tmp_path, capsys, "variant=bn", "input_size=224", "lr=0.01")


@pytest.mark.cifar
def test_cifar_slice_evaluate_reproduces_val_predictions(tmp_path, cifar_root):
    from googlenet.infer.evaluate import evaluate

    settings = ["limit_train=64", "limit_val=60", "epochs=1", "batch_size=32"]
    cfg = resolve_config(
        overrides=[f"out={tmp_path / 'run'}", f"data_root={cifar_root}", *settings]
    )
    train(cfg, progress=False)  # precision auto: bf16 autocast on CPUs that have it
    val = read_predictions(tmp_path / "run" / VAL_PREDICTIONS)
    assert len(val) == 60 and len({r["true"] for r in val}) == 10  # stratified: every class
    result = evaluate([tmp_path / "run"])  # the recorded data, weights, precision and batch
    classes = result.classes
    assert [classes[p] for _, _, p, _ in result.predictions] == [r["predicted"] for r in val]
    assert [classes[t] for _, t, _, _ in result.predictions] == [r["true"] for r in val]


def test_sub_folders_match_classes_ignoring_case_and_separators(tmp_path):
    root = photo_folder(tmp_path, {"val": ["airplane", "bird"]}, 1)
    (root / "val" / "airplane").rename(root / "val" / "Air-Plane")
    (root / "val" / "bird").rename(root / "val" / "BIRD")
    with pytest.warns(UserWarning, match="automobile"):
        paths, labels, _ = list_image_folder(root / "val", ["air_plane", "automobile", "bird"])
    assert [p.parent.name for p in paths] == ["Air-Plane", "BIRD"] and labels.tolist() == [0, 2]


@pytest.mark.parametrize("split", ["train", "val"])
def test_two_sub_folders_of_one_class_name_are_an_error_naming_both(tmp_path, split):
    root = photo_folder(tmp_path, {split: ["bird"]}, 1)
    (root / split / "Bird").mkdir()
    classes = None if split == "train" else ["airplane", "bird"]
    with pytest.raises(UserError, match=r"'Bird' and 'bird' name the same class"):
        load_image_folder(root / split, size=32, classes=classes)


def test_an_imagenet_synset_folder_maps_in_sorted_order(tmp_path):
    synsets = [f"n{i:08d}" for i in range(1000)]
    for s in synsets[:2]:
        (tmp_path / s).mkdir()
    names = [f"class {i}" for i in range(1000)]
    assert map_classes(tmp_path, synsets, names) == list(range(1000))
    with pytest.raises(UserError, match="n00000000, n00000001 are not training classes"):
        map_classes(tmp_path, synsets[:2], names)


def test_evaluate_replays_a_folder_holdout_run_on_its_held_out_images(tmp_path, capsys):
    """The held-out images are rebuilt by training's own functions from the recorded config
    (before, evaluate refused: "cannot be rebuilt here")."""
    root = photo_folder(tmp_path / "data", {"train": list(COLOURS), "val": list(COLOURS)}, 4)
    run = tmp_path / "run"
    args = ["train", "--quiet", "--data", str(root), "--out", str(run)]
    for s in ("dataset=folder", "epochs=1", "batch_size=3", "aux_logits=false", "holdout=6"):
        args += ["--set", s]
    assert main(args) == 0
    val = read_predictions(run / VAL_PREDICTIONS)
    assert len(val) == 6
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    again = read_predictions(tmp_path / "eval" / "predictions.csv")
    key = "path" if "path" in val[0] else "index"
    assert [(r[key], r["true"], r["predicted"]) for r in again] == [
        (r[key], r["true"], r["predicted"]) for r in val
    ]
    probs = np.array([[float(r["probability"]) for r in rows] for rows in (val, again)])
    assert np.abs(probs[0] - probs[1]).max() < 1e-3
