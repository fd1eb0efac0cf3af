from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from googlenet.cli import main
from googlenet.insight.report import report_after_training, write_report
from googlenet.training.config import resolve_config
from googlenet.training.loop import train
from tests.conftest import make_run, synth


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        d = dict(attrs)
        if tag == "img":
            self.srcs.append(d.get("src") or "")
        if tag in ("script", "link") and (d.get("src") or d.get("href")):
            self.links.append(d.get("src") or d.get("href") or "")


def test_report_is_one_self_contained_file_with_every_section(tmp_path: Path):
    run = make_run(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    for heading in (
        "Config",
        "Loss and accuracy per head",
        "confusion matrix and per-class accuracy",
        "Sample predictions",
        "Most confident mistakes, with Grad-CAM",
        "Branch usage",
        "Timing",
        "First-layer filters",
    ):
        assert heading in text, heading
    parser = Images()
    parser.feed(text)
    assert not parser.links  # no scripts or style sheets fetched from anywhere
    assert len(parser.srcs) >= 8
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size[0] > 0 and im.size[1] > 0
    # 3 of 12 recorded predictions are wrong: 75% top-1, and 3 Grad-CAM figures
    assert "top-1 75.00% on 12 images" in text
    assert len(re.findall(r"<figure>", text)) == 3
    assert "151, 152" in text  # images/s per epoch


def test_report_never_replaces_silently_and_cli_regenerates(tmp_path: Path, capsys):
    run = make_run(tmp_path / "run", n_val=6)
    (run / "report.html").write_text("mine")
    assert main(["report", str(run)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (run / "report.html").read_text() == "mine"
    assert main(["report", str(run), "--force"]) == 0
    page = run / "report.html"
    assert page.read_text().startswith("<!doctype html>")
    page.write_text(page.read_text().replace("</footer>", "(an older page)</footer>"))
    assert write_report(run) == page  # a page googlenet wrote: regenerated without --force
    assert "(an older page)" not in page.read_text()
    page.write_text("<p>my notes</p>")  # the user's own file of that name is kept
    assert report_after_training(run) is None
    assert page.read_text() == "<p>my notes</p>"
    assert "not written by googlenet" in capsys.readouterr().err


def test_report_without_recorded_predictions_says_what_is_missing(tmp_path: Path):
    run = make_run(tmp_path / "run")
    (run / "val_predictions.csv").unlink()
    text = write_report(run).read_text()
    assert "no val_predictions.csv in the run folder" in text
    assert "Loss and accuracy per head" in text


def test_report_on_a_missing_run_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_report_on_a_folder_run_shows_its_pictures_read_by_path(tmp_path: Path):
    """A folder run records each image's index and file; the picture grids read the files
    (recorded_val_set rebuilds only CIFAR sets, so reading by index showed none)."""
    run = make_run(tmp_path / "run")
    text = write_report(run).read_text()
    assert "Sample predictions" in text and "Most confident mistakes" in text
    assert "no picture grids" not in text
    assert html.escape(str(run / "val" / "v0.png")) in text  # a mistake's caption names its file
    for f in (run / "val").iterdir():
        f.unlink()
    text = write_report(run).read_text()
    assert "Sample predictions" not in text and "give --data" not in text
    assert "files are not readable here: no picture grids" in text


def test_report_reads_only_what_the_writer_writes(tmp_path: Path, capsys):
    run = make_run(tmp_path / "run")
    (run / "val_predictions.csv").write_text("path,label,pred,prob\na.png,cat,dog,0.9\n")
    assert main(["report", str(run)]) == 2
    assert "val_predictions.csv: columns" in capsys.readouterr().err


def test_report_summary_and_confusion_name_the_recorded_tta(tmp_path: Path, monkeypatch):
    import googlenet.infer.evaluate

    titled: list[str] = []
    confusion_png = googlenet.infer.evaluate.confusion_png

    def watched(result):
        titled.append(result.tta)
        return confusion_png(result)

    monkeypatch.setattr(googlenet.infer.evaluate, "confusion_png", watched)
    text = write_report(make_run(tmp_path / "run", tta="flip")).read_text()
    assert titled == ["flip"]  # the matrix of the flip-TTA predictions says so
    assert "val top-1 with tta=flip (final)</td><td>58.25%" in text
    assert "test-time augmentation: flip" in text


# --- written at the end of training -------------------------------------------------------------


def _train_tiny(out: Path, *extra: str) -> Any:
    """A tiny run, then its report as `googlenet train` writes it (cli._run_train)."""
    import googlenet.insight.report

    cfg = resolve_config(
        overrides=[f"out={out}", "epochs=1", "input_size=16", "batch_size=8", "precision=fp32",
                   "channels_last=false", "warmup_min_steps=0", "ema=false", "tta=none", *extra]
    )  # fmt: skip
    result = train(cfg, train_set=synth(8, 0), val_set=synth(12, 1), progress=False)
    assert not (out / "report.html").exists()  # train() writes none: the CLI does
    googlenet.insight.report.report_after_training(result.out, result.val_set, progress=False)
    return result


@pytest.mark.run_report
def test_training_writes_the_report_from_its_recorded_validation(tmp_path: Path, monkeypatch):
    import googlenet.infer.evaluate
    import googlenet.insight.report
    from googlenet.training import validation

    reporting: list[bool] = []  # non-empty while the report is being built
    build, validate = googlenet.insight.report.build_report, validation.validate

    def watched_build(*a, **k):
        reporting.append(True)
        try:
            return build(*a, **k)
        finally:
            reporting.pop()

    def watched_validate(*a, **k):
        assert not reporting, "the report must reuse the recorded validation"
        return validate(*a, **k)

    monkeypatch.setattr(googlenet.insight.report, "build_report", watched_build)
    monkeypatch.setattr(validation, "validate", watched_validate)
    monkeypatch.setattr(googlenet.infer.evaluate, "evaluate", watched_validate)
    result = _train_tiny(tmp_path / "run", "tta=flip")
    text = (tmp_path / "run" / "report.html").read_text()
    for heading in (
        "Loss and accuracy per head",
        "confusion matrix and per-class accuracy",
        "Sample predictions",
        "Branch usage",
    ):
        assert heading in text, heading
    # the confusion section is the run's own final (TTA) validation (val_predictions.csv)
    acc = result.metrics["val_tta_acc"]
    assert f"top-1 {acc:.2f}% on 12 images (recorded in val_predictions.csv; test-time" in text
    assert "last.safetensors" in text


@pytest.mark.run_report
def test_a_failing_report_warns_once_and_keeps_the_run(tmp_path: Path, monkeypatch, capsys):
    import googlenet.insight.report

    def broken(*a, **k):
        raise RuntimeError("no plots today\n(second line)")

    monkeypatch.setattr(googlenet.insight.report, "build_report", broken)
    result = _train_tiny(tmp_path / "run")  # returns normally: the CLI exits 0
    run = tmp_path / "run"
    assert (run / "last.safetensors").is_file() and (run / "val_predictions.csv").is_file()
    assert result.metrics["val_acc"] >= 0 and not (run / "report.html").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: no {run / 'report.html'}: no plots today (second line)"]
