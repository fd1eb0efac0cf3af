"""Folder listing: no file opened, cached outside the data folder, never stale."""

from __future__ import annotations

import pytest

from googlenet.data.listing import list_folder, user_cache_dir
from googlenet.errors import UserError


def _tree(root):
    for c in ("b", "a"):
        (root / c / "deep").mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.jpg").write_bytes(b"not decoded")
        (root / c / "deep" / "x.png").write_bytes(b"")
        (root / c / ".hidden.jpg").write_bytes(b"")
    (root / ".git").mkdir()
    (root / "README").write_text("a file beside the classes is not a sample")


def test_listing_and_its_cache(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "run"
    _tree(data)
    first = list_folder(data, cache_dir=cache)
    assert first.classes == ["a", "b"] and not first.cached
    assert first.files[:4] == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/deep/x.png"]
    assert first.labels == [0] * 4 + [1] * 4
    assert [p.name for p in first.paths()][:1] == ["0.jpg"]
    assert list(cache.iterdir())  # the cache is in cache_dir ...
    assert sorted(p.name for p in data.iterdir()) == [".git", "README", "a", "b"]  # not here
    again = list_folder(data, cache_dir=cache)
    assert again.cached and (again.files, again.labels) == (first.files, first.labels)
    # a new file (also in a nested folder) or a new class makes the cache stale
    (data / "a" / "deep" / "y.jpg").write_bytes(b"")
    assert "a/deep/y.jpg" in list_folder(data, cache_dir=cache).files
    (data / "c").mkdir()
    (data / "c" / "z.jpg").write_bytes(b"")
    third = list_folder(data, cache_dir=cache)
    assert not third.cached and third.classes == ["a", "b", "c"]
    assert list_folder(data, cache_dir=cache).cached


def test_unwritable_cache_only_costs_a_walk(tmp_path):
    data = tmp_path / "data"
    _tree(data)
    (tmp_path / "file").write_text("")  # a cache dir "under a file" cannot be created
    assert len(list_folder(data, cache_dir=tmp_path / "file" / "sub").files) == 8
    assert not list_folder(data, cache_dir=tmp_path / "file" / "sub").cached


def test_errors_and_cache_dir(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="image folder not found"):
        list_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        list_folder(tmp_path / "empty")
    monkeypatch.setenv("GOOGLENET_CACHE", str(tmp_path / "c"))
    assert user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GOOGLENET_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache_dir() == tmp_path / "x" / "googlenet"
