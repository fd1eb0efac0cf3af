"""Use a trained model: `googlenet.load(ckpt)` gives a Predictor that takes image files, PIL
images or tensors and returns labels with probabilities.

Preprocessing is the checkpoint's `Preprocess` (transforms.py), exactly as validation used it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.checkpoint import CheckpointMeta
from googlenet.devices import make_runner, pick_device, pick_dtype
from googlenet.errors import UserError
from googlenet.transforms import Preprocess, image_tensor, read_image


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
        self,
        model: nn.Module,
        meta: CheckpointMeta,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        # device: auto | cpu | cuda (or a torch.device); precision: fp32 | bf16 | fp16 | auto
        # (auto: bf16 autocast where the hardware runs it fast).
        self.device = (
            device if isinstance(device, torch.device) else pick_device(device, what="device")
        )
        self.dtype = pick_dtype(precision, self.device, what="precision")
        self.model = model.eval()
        self.meta = meta
        self.preprocess: Preprocess = meta.preprocess
        self.classes: list[str] = list(meta.classes)
        self._run = make_runner(
            model, self.device, self.dtype, channels_last=self.dtype is not None
        )

    def predict_tensor(self, x: Tensor) -> Tensor:
        """Class probabilities (N x C, float32) for an already normalised N x 3 x S x S batch."""
        return torch.softmax(self._run(x.float()), dim=1)

    def prepare(self, image: ImageLike) -> Tensor:
        """One image of any accepted kind -> the normalised 3 x S x S model input."""
        return self.preprocess(as_image_tensor(image))

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
    """A path, PIL image or 3 x H x W tensor -> a 3 x H x W tensor (uint8, or float 0..1). Paths
    and PIL images go through the one decoder (transforms.decode_image), so a PIL image and
    its file give the same pixels and obey the same limits."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise UserError(f"expected a 3 x H x W image tensor, got shape {tuple(image.shape)}")
        return image
    if hasattr(image, "getbands"):  # a PIL image: decoded as its file would be
        return image_tensor(image)
    raise UserError(f"cannot classify a {type(image).__name__}; give a path, PIL image or tensor")


def load(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    weights: str = "auto",
    precision: str = "fp32",
) -> Predictor:
    """Load a checkpoint (file or run folder, or a weights name: "torchvision", downloaded once;
    an existing path wins) as a Predictor: `googlenet.load(p).predict(x)`.
    weights: auto (what the run validated) | model | ema; device: auto | cpu | cuda;
    precision: fp32 | bf16 | fp16 | auto."""
    from googlenet.checkpoint import bad_metadata, load_model
    from googlenet.weights import resolve

    checkpoint = resolve(checkpoint)
    model, meta = load_model(checkpoint, weights=weights)
    with bad_metadata(checkpoint):
        return Predictor(model, meta, device, precision)


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
        pending.append((path, predictor.preprocess(img)))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
