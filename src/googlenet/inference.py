"""Use a trained model: `googlenet.load(ckpt)` gives a Predictor that takes image files, PIL
images or tensors and returns labels with probabilities.

Preprocessing comes from the checkpoint's meta["preprocess"]: pixels to 0..1, shorter side
resized to `resize` (or `input_size` when null), centre crop `input_size`, (x - mean) / std.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.errors import UserError


@dataclass(frozen=True)
class Preprocess:
    """How a checkpoint's model expects its input (meta["preprocess"])."""

    input_size: int  # side of the square crop fed to the model
    mean: tuple[float, float, float]  # per-channel mean on the 0..1 scale
    std: tuple[float, float, float]  # per-channel std on the 0..1 scale
    resize: int | None = None  # shorter side before the centre crop; None: input_size

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str = "checkpoint") -> Preprocess:
        pp = meta.get("preprocess")
        if not isinstance(pp, dict):
            raise UserError(f"{source}: checkpoint metadata has no 'preprocess' section")
        try:
            return cls(
                input_size=int(pp["input_size"]),
                mean=tuple(float(v) for v in pp["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in pp["std"]),  # type: ignore[arg-type]
                resize=None if pp.get("resize") is None else int(pp["resize"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: bad 'preprocess' metadata {pp!r}: {e}") from e

    @property
    def shorter_side(self) -> int:
        return self.resize or self.input_size


def to_float(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; float input is taken as already on the 0..1 scale."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def resize_shorter(images: Tensor, size: int) -> Tensor:
    """Resize a float N x 3 x H x W batch so its shorter side is `size`, keeping the aspect."""
    h, w = images.shape[-2:]
    new = resized_shape(h, w, size)
    if new == (h, w):
        return images
    return F.interpolate(images, size=new, mode="bilinear", align_corners=False, antialias=True)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, keeping the aspect ratio."""
    if min(height, width) == size:
        return height, width
    if height <= width:
        return size, max(1, round(width * size / height))
    return max(1, round(height * size / width)), size


def resize_square(images: Tensor, size: int) -> Tensor:
    """Resize a float N x 3 x H x W batch to size x size (no-op when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def center_crop(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = images.new_tensor(mean).view(-1, 1, 1)
    s = images.new_tensor(std).view(-1, 1, 1)
    return (images - m) / s


def preprocess_batch(images: Tensor, pp: Preprocess) -> Tensor:
    """uint8 (or 0..1 float) N x 3 x H x W -> the normalised N x 3 x S x S model input."""
    x = resize_shorter(to_float(images), pp.shorter_side)
    return normalize(center_crop(x, pp.input_size), pp.mean, pp.std).contiguous()


@dataclass
class Prediction:
    """One image's result: the best label and the top-k (label, probability) pairs."""

    label: str  # most probable class name
    index: int  # its class index
    prob: float  # its probability
    topk: list[tuple[str, float]] = field(default_factory=list)  # best first
    source: str | None = None  # file path when the image came from a file

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "label": self.label,
            "index": self.index,
            "prob": self.prob,
            "topk": [{"label": lbl, "prob": p} for lbl, p in self.topk],
        }


ImageLike = Any  # a path (str/Path), a PIL image, or a 3 x H x W uint8/float tensor


class Predictor:
    """A model with its class names and preprocessing, ready to classify images."""

    def __init__(
        self, model: nn.Module, meta: dict[str, Any], device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.meta = meta
        self.preprocess = Preprocess.from_meta(meta)
        classes = meta.get("classes")
        n = getattr(model, "num_classes", None)
        if not classes:
            classes = [str(i) for i in range(n or 0)]
        if n is not None and len(classes) != n:
            raise UserError(f"checkpoint lists {len(classes)} classes for a {n}-class model")
        self.classes: list[str] = list(classes)

    @torch.inference_mode()
    def predict_tensor(self, x: Tensor) -> Tensor:
        """Class probabilities (N x C, float32) for an already normalised N x 3 x S x S batch."""
        logits = self.model(x.to(self.device, torch.float32))
        return torch.softmax(logits.float(), dim=1).cpu()

    def prepare(self, image: ImageLike) -> Tensor:
        """One image of any accepted kind -> the normalised 3 x S x S model input."""
        return preprocess_batch(as_image_tensor(image).unsqueeze(0), self.preprocess)[0]

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, batch_size: int = 32
    ) -> list[Prediction]:
        """Classify one image or a list of them (paths, PIL images, 3 x H x W tensors: uint8
        0..255 or float 0..1). Always returns a list, one Prediction per image."""
        single = isinstance(images, (str, Path)) or hasattr(images, "getbands")
        if single or (isinstance(images, Tensor) and images.dim() == 3):
            images = [images]
        out: list[Prediction] = []
        items = list(images)
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            x = torch.stack([self.prepare(im) for im in chunk])
            probs = self.predict_tensor(x)
            for im, p in zip(chunk, probs, strict=True):
                source = str(im) if isinstance(im, (str, Path)) else None
                out.append(self.to_prediction(p, top_k, source))
        return out

    def to_prediction(self, probs: Tensor, top_k: int = 5, source: str | None = None) -> Prediction:
        k = max(1, min(top_k, probs.numel()))
        values, indices = probs.topk(k)
        topk = [(self.classes[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]
        best = int(indices[0])
        return Prediction(self.classes[best], best, float(values[0]), topk, source)


def as_image_tensor(image: ImageLike) -> Tensor:
    """A path, PIL image or 3 x H x W tensor -> a 3 x H x W tensor (uint8, or float 0..1)."""
    if isinstance(image, (str, Path)):
        from googlenet.data import read_image

        return read_image(image)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise UserError(f"expected a 3 x H x W image tensor, got shape {tuple(image.shape)}")
        return image
    if hasattr(image, "getbands"):  # a PIL image
        import numpy as np

        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    raise UserError(f"cannot classify a {type(image).__name__}; give a path, PIL image or tensor")


def load(
    checkpoint: str | Path, device: str | torch.device = "cpu", weights: str = "auto"
) -> Predictor:
    """Load a checkpoint (file or run folder) as a Predictor: `googlenet.load(p).predict(x)`."""
    from googlenet.checkpoint import load_model

    model, meta = load_model(checkpoint, weights=weights)
    return Predictor(model, meta, device)


def iter_image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files named, and every non-hidden file under the folders named (sorted, recursive).

    Folders are not filtered by extension: a file that is not an image is reported by name
    rather than silently skipped."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") for part in rel):
                    yield f
        else:
            yield p  # missing files are reported by the reader


def predict_files(
    predictor: Predictor, paths: Iterable[str | Path], top_k: int = 5, batch_size: int = 16
) -> Iterator[tuple[Path, Prediction | None, str | None]]:
    """(path, prediction, None) per readable image, (path, None, error message) per bad file,
    in input order; a bad file never stops the others."""
    from googlenet.data import read_image

    pending: list[tuple[Path, Tensor]] = []

    def flush() -> Iterator[tuple[Path, Prediction | None, str | None]]:
        if pending:
            probs = predictor.predict_tensor(torch.stack([x for _, x in pending]))
            for (path, _), p in zip(pending, probs, strict=True):
                yield path, predictor.to_prediction(p, top_k, str(path)), None
            pending.clear()

    for path in iter_image_files(paths):
        try:
            img = read_image(path)
        except (UserError, OSError, ValueError) as e:
            yield from flush()  # keep the output in input order
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            yield path, None, msg
            continue
        pending.append((path, preprocess_batch(img.unsqueeze(0), predictor.preprocess)[0]))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
