"""Inference: load a checkpoint and predict, evaluate, export.

- inference: `load(ckpt) -> Predictor` (files, PIL images, tensors -> labels, probabilities)
- evaluate: top-1/top-5, per-class accuracy, confusion matrix, TTA and ensembles
- export: ONNX and TorchScript, verified against PyTorch

The names below are imported on first use, so loading a model does not load export's ONNX.
"""

from __future__ import annotations

from googlenet import lazy

# Public name -> the module that defines it.
_PUBLIC = {
    **dict.fromkeys(
        ["Prediction", "Predictor", "as_image_tensor", "iter_image_files", "load",
         "predict_files"],
        "googlenet.infer.inference",
    ),
    **dict.fromkeys(
        ["Member", "confusion_png", "evaluate", "evaluate_batches", "format_result",
         "load_members", "write_report"],
        "googlenet.infer.evaluate",
    ),
    **dict.fromkeys(
        ["ExportReport", "export_checkpoint", "export_model", "onnx_bytes", "onnx_runner",
         "torchscript_bytes", "torchscript_runner", "verify"],
        "googlenet.infer.export",
    ),
}  # fmt: skip

__getattr__, __dir__ = lazy.names(__name__, _PUBLIC)

__all__ = sorted(_PUBLIC)
