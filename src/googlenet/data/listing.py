"""Listing a folder of class sub-folders fast, and caching the listing.

`list_folder(root)` walks root/<class>/... with os.scandir: no image is opened, no file is
stat'ed beyond what the directory entries hold, so a million files list in seconds. Every
non-hidden file is a sample (a non-image is found, and skipped, when it is read).

With `cache_dir` the listing is kept there as JSON (named by a hash of the folder's absolute
path) and reused while every listed directory's modification time is unchanged: adding,
removing or renaming a file changes its directory's mtime, so a stale listing is never used,
and a restart only stats the directories (about 1,000 for ImageNet) instead of walking the
files. The cache lives in the run folder or the user's cache directory (`user_cache_dir`),
never in the data folder, which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from googlenet.errors import UserError

CACHE_ENV = "GOOGLENET_CACHE"
FORMAT = "googlenet-listing/1"


@dataclass
class Listing:
    root: Path  # the folder listed
    classes: list[str]  # sub-folder names, sorted; index = label
    files: list[str]  # every sample's path relative to root ('/'-separated), by class then name
    labels: list[int]  # class index per file
    cached: bool = False  # True when read from the cache instead of walking the folder

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]


def user_cache_dir() -> Path:
    """$GOOGLENET_CACHE, else $XDG_CACHE_HOME/googlenet, else ~/.cache/googlenet."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "googlenet"


def _walk(top: Path, rel: str, files: list[str], dirs: dict[str, int]) -> None:
    """Append every non-hidden file under `top` (relative path prefix `rel`) and record each
    directory's mtime (ns), recursively."""
    dirs[rel] = os.stat(top).st_mtime_ns
    subdirs = []
    with os.scandir(top) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                subdirs.append(e.name)
            elif e.is_file():
                files.append(f"{rel}/{e.name}")
    for name in subdirs:
        _walk(top / name, f"{rel}/{name}", files, dirs)


def _cache_file(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_dir / f"listing-{key}.json"


def _read_cache(path: Path, root: Path) -> Listing | None:
    """The cached listing when it is for `root` and no listed directory changed, else None."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("root") != str(root):
            return None
        for rel, mtime in meta["dirs"].items():
            if os.stat(root / rel).st_mtime_ns != mtime:
                return None
        classes = list(meta["classes"])
        files: list[str] = []
        labels: list[int] = []
        for k, c in enumerate(classes):
            names = meta["files"][c]
            files += names
            labels += [k] * len(names)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable or stale: list again
    return Listing(root, classes, files, labels, cached=True)


def list_folder(root: str | Path, cache_dir: str | Path | None = None) -> Listing:
    """Every file under root/<class>/ (recursively; names starting with '.' are skipped),
    classes = sorted sub-folder names. See the module docstring for the cache."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    cache = _cache_file(root, Path(cache_dir)) if cache_dir is not None else None
    if cache is not None:
        hit = _read_cache(cache, root)
        if hit is not None:
            return hit
    dirs = {".": os.stat(root).st_mtime_ns}
    by_class: dict[str, list[str]] = {}
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        for c in classes:
            found: list[str] = []
            _walk(root / c, c, found, dirs)
            by_class[c] = sorted(found)
    except OSError as e:
        raise UserError(f"{e.filename or root}: cannot list ({e.strerror or e})") from e
    if not classes:
        raise UserError(f"{root}: no class sub-folders (expected one folder per class)")
    files = [f for c in classes for f in by_class[c]]
    labels = [k for k, c in enumerate(classes) for _ in by_class[c]]
    if cache is not None:
        meta = {"format": FORMAT, "root": str(root), "dirs": dirs, "classes": classes}
        meta["files"] = by_class
        try:
            from googlenet.files import atomic_write_text

            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(meta, separators=(",", ":")))
        except (OSError, UserError):
            pass  # a cache that cannot be written only costs the next start a walk
    return Listing(root, classes, files, labels)
