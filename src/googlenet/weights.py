"""Pretrained weights by name: `WEIGHTS` says where each name's file is published and its
SHA-256 prefix. The file is downloaded once with torch.hub.download_url_to_file (hash-prefix
checked; a mismatching or truncated transfer is never left in the cache) into torch's hub cache,
$TORCH_HOME/hub/checkpoints, and converted once to a googlenet checkpoint beside it.

"torchvision": the ImageNet GoogLeNet weights the PyTorch project publishes with torchvision
(BSD-3-Clause) at download.pytorch.org. torchvision's documentation notes that pretrained
weights may carry the terms of the data they were trained on: ImageNet's are for
non-commercial research and education; whether a use is allowed is the user's to check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from googlenet.errors import UserError


@dataclass(frozen=True)
class WeightsSource:
    url: str  # where the file is published; its last path part is the cached file's name
    hash_prefix: str  # the first hex digits of its SHA-256 (torch.hub's convention)
    description: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The one table of names (tests point it at a local server).
WEIGHTS: dict[str, WeightsSource] = {
    "torchvision": WeightsSource(
        url="https://download.pytorch.org/models/googlenet-1378be20.pth",
        hash_prefix="1378be20",
        description="torchvision's ImageNet GoogLeNet (variant bn, 1000 classes)",
    ),
}


def checkpoints_dir() -> Path:
    """torch's cache of downloaded weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def source(name: str) -> WeightsSource:
    if name not in WEIGHTS:
        raise UserError(f"unknown weights name {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def check_hash(path: Path, prefix: str) -> None:
    """Refuse a file whose SHA-256 does not start with `prefix` (a partial or other file)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise UserError(
            f"{path}: SHA-256 {digest[: len(prefix)]}... does not match the expected {prefix}...; "
            "delete it and download again"
        )


def fetch(name: str, progress: bool = False) -> Path:
    """The named weights file in the hub cache, downloaded (hash-checked) when missing."""
    src = source(name)
    path = checkpoints_dir() / src.file_name
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(src.url, str(path), src.hash_prefix, progress=progress)
    except RuntimeError as e:  # torch's "invalid hash value": the temp file is already gone
        raise UserError(f"{src.url}: downloaded file refused ({e})") from e
    except OSError as e:  # offline, proxy, refused: URLError is an OSError
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download {src.url} ({reason}); download it by hand to {path} and run again"
        ) from e
    return path


def pretrained(name: str) -> Path:
    """The named weights as a googlenet checkpoint (converted once, cached beside the file)."""
    from googlenet.torchvision_weights import CHECKPOINT_NAME, convert_torchvision

    src = source(name)
    path = fetch(name)
    out = path.with_name(f"{Path(src.file_name).stem}-googlenet")
    if (out / CHECKPOINT_NAME).is_file():
        return out / CHECKPOINT_NAME
    check_hash(path, src.hash_prefix)  # a file put there by hand is checked once, here
    return convert_torchvision(path, out)


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint path as given, or a weights name's cached checkpoint. An existing path wins
    over a name (a folder called `torchvision`); anything else is returned for its reader to
    report."""
    p = Path(path_or_name)
    if p.exists() or str(path_or_name) not in WEIGHTS:
        return p
    return pretrained(str(path_or_name))


def check_named_file(path: str | Path) -> None:
    """A file named as torch.hub names weights (googlenet-<sha256 prefix>.pth) must match it."""
    p = Path(path)
    m = re.fullmatch(r"[\w.]+-([a-f0-9]{6,})\.pth", p.name)
    if m and p.is_file():
        check_hash(p, m.group(1))
