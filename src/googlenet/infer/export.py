"""Export a checkpoint's eval-mode model (logits only) to ONNX or TorchScript, and check the
exported file against the PyTorch model on random and real inputs before reporting success.

onnx/onnxruntime are an optional extra (`pip install googlenet[onnx]`), imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.checkpoint import CheckpointMeta
from googlenet.devices import pick_device
from googlenet.errors import UserError

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17
# Max |logit difference| accepted between PyTorch and the export (fp32), relative to the logit
# scale max(1, max |logit|): fp32 rounding grows with the logits, so a trained model with
# logits in the hundreds differs by more than 1e-4 in absolute terms while being exact.
TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """Where the export went and how far its outputs are from PyTorch's."""

    path: Path
    format: str
    diffs: dict[str, float] = field(default_factory=dict)  # input kind -> max |diff| of logits
    limits: dict[str, float] = field(default_factory=dict)  # input kind -> the |diff| allowed
    notes: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values(), default=float("nan"))


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(
            f"ONNX export needs onnx and onnxruntime ({e.name} is missing): "
            "pip install 'googlenet[onnx]'"
        ) from e
    return onnx, onnxruntime


def onnx_bytes(model: nn.Module, input_size: int, meta: CheckpointMeta | None = None) -> bytes:
    """The eval-mode model as ONNX (opset 17, dynamic batch axis), with the checkpoint's class
    names and preprocessing in the model's metadata_props."""
    onnx, _ = _require_onnx()
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        # The TorchScript-based exporter: GoogLeNet is plain convolutions, it exports cleanly
        # and needs no onnxscript at run time.
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in _meta_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _meta_props(meta: CheckpointMeta | None) -> dict[str, str]:
    if meta is None:
        return {}
    header = meta.to_header()
    keep = {k: header[k] for k in ("model", "classes", "preprocess", "dataset")}
    return {"googlenet": json.dumps(keep)}


def torchscript_bytes(
    model: nn.Module, input_size: int, meta: CheckpointMeta | None = None
) -> bytes:
    """The eval-mode model traced to TorchScript, meta as extra file 'googlenet.json'."""
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        extra = {f"{k}.json": v for k, v in _meta_props(meta).items()}
        torch.jit.save(traced, buf, _extra_files=extra)
    return buf.getvalue()


def onnx_runner(path: Path) -> Any:
    _, ort = _require_onnx()
    opts = ort.SessionOptions()
    # Idle ORT threads otherwise spin for a while after each run, starving PyTorch's threads
    # on a small shared CPU (batch-1 PyTorch latency went from 50 ms to 1.5 s in the bench).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    return run


def torchscript_runner(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        return module(x)

    return run


def verify(
    model: nn.Module,
    run: Any,
    inputs: dict[str, Tensor],
    tolerance: float = TOLERANCE,
    device: str | torch.device = "cpu",
    limits: dict[str, float] | None = None,
) -> dict[str, float]:
    """Max |logit difference| between `model` (run in fp32 on `device`, TF32 off) and an
    exported `run` per named input batch; UserError when one exceeds `tolerance` x the logit
    scale max(1, max |logit|). The allowed difference per batch goes into `limits` when given."""
    diffs = {}
    device = torch.device(device)
    model = model.eval().to(device)
    for name, x in inputs.items():
        with torch.inference_mode(), _strict_fp32():
            ref = model(x.to(device)).float().cpu()
        got = run(x.contiguous()).float()
        if got.shape != ref.shape:
            raise UserError(
                f"export check ({name}): output {tuple(got.shape)} != {tuple(ref.shape)}"
            )
        diffs[name] = float((got - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        allowed = tolerance * scale
        if limits is not None:
            limits[name] = allowed
        if not diffs[name] <= allowed:
            raise UserError(
                f"export check ({name}): max |logit difference| {diffs[name]:.3g} exceeds "
                f"{allowed:.3g} ({tolerance:g} x the logit scale {scale:.3g})"
            )
    return diffs


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """fp32 really: no TF32 convolutions or matmuls on a CUDA reference (the checks compare
    logits to 1e-4)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def real_inputs(meta: CheckpointMeta, data: str | Path | None, n: int = 8) -> Tensor | None:
    """A few real test images, preprocessed as the checkpoint says (CIFAR test split when the
    checkpoint is a CIFAR one and the data is found), else None."""
    from googlenet.data.arrays import resolve_data_root
    from googlenet.data.cifar import load_cifar

    if meta.dataset not in ("cifar10", "cifar100"):
        return None
    try:
        ds = load_cifar(resolve_data_root(data), meta.dataset, "test")
    except UserError:
        return None
    return meta.preprocess(ds.images[:n])


def export_model(
    model: nn.Module,
    out: str | Path,
    fmt: str,
    input_size: int,
    meta: CheckpointMeta | None = None,
    real: Tensor | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ExportReport:
    """Export `model` to `out` (written atomically) and verify it against the PyTorch model
    on `device` (fp32): random batches of 1 and 3 (the batch axis is dynamic) and, when given,
    real preprocessed images. The file itself is always made from a CPU copy."""
    from googlenet.files import atomic_write_bytes

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    model = model.eval().cpu()
    out = Path(out)
    data = (onnx_bytes if fmt == "onnx" else torchscript_bytes)(model, input_size, meta)
    atomic_write_bytes(out, data)
    run = (onnx_runner if fmt == "onnx" else torchscript_runner)(out)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "random batch 1": torch.randn(1, 3, input_size, input_size, generator=g),
        "random batch 3": torch.randn(3, 3, input_size, input_size, generator=g),
    }
    report = ExportReport(out, fmt)
    if real is not None:
        inputs[f"real batch {real.shape[0]}"] = real
    else:
        report.notes.append("no real images found (CIFAR checkpoints use the test split)")
    report.diffs = verify(model, run, inputs, tolerance, device, report.limits)
    return report


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path | None = None,
    data: str | Path | None = None,
    tolerance: float = TOLERANCE,
    device: str = "auto",
) -> ExportReport:
    """Export a checkpoint's model (the weights its run validated) and verify the file, with
    the reference forward on `device` (auto | cpu | cuda)."""
    from googlenet.checkpoint import load_model, resolve_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()  # fail before the slow part
    src = resolve_checkpoint(checkpoint)
    dev = pick_device(device, what="--device")
    model, meta = load_model(src)
    target = Path(out) if out else src.with_name(src.stem + SUFFIX[fmt])
    real = real_inputs(meta, data)
    size = meta.preprocess.input_size
    return export_model(model, target, fmt, size, meta, real, tolerance, device=dev)
