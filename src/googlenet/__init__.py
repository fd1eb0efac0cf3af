"""GoogLeNet / Inception v1: build, train, evaluate, export and serve.

The package is lazy (PEP 562): `import googlenet` loads the model, not the training engine or
the inference stack; each name below is imported on first use. The layout:

- core (this folder): model, transforms, checkpoint, files, logs, devices, metrics, tta, fuse,
  fastpool, summary, torchvision_weights, errors
- data/: CIFAR, image folders, shards, the batch loader, augmentation
- training/: config and recipes, the training loop, optimizer, speed-run, fine-tuning, runs
- infer/: load and predict, evaluate, export
- insight/: branch usage, Grad-CAM, feature visualisation, the run report
- front doors: cli, serve, __main__
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

# Light and always wanted: eager, and bound after their modules so the functions win over the
# submodules of the same name (googlenet.summary is the function).
from googlenet.errors import UserError
from googlenet.model import (
    INCEPTION_TABLE,
    VARIANTS,
    GoogLeNet,
    GoogLeNetOutputs,
    VariantSpec,
    build,
    get_spec,
    list_variants,
)
from googlenet.summary import summary

if TYPE_CHECKING:
    from googlenet.infer.inference import Prediction, Predictor, load
    from googlenet.training.config import TrainConfig, resolve_config
    from googlenet.training.loop import RunResult, train

# Public names imported on first use: name -> module that defines it.
_LAZY = {
    "Prediction": "googlenet.infer.inference",
    "Predictor": "googlenet.infer.inference",
    "load": "googlenet.infer.inference",
    "RunResult": "googlenet.training.loop",
    "train": "googlenet.training.loop",
    "TrainConfig": "googlenet.training.config",
    "resolve_config": "googlenet.training.config",
}

# Module paths from before the subpackages (README, docs, user scripts): old -> new. Both
# `import googlenet.engine` and `googlenet.engine` resolve to the new module. (So
# `googlenet.evaluate` is the module, as before; its function is `googlenet.evaluate.evaluate`.)
MOVED = {
    "augment": "googlenet.data.augment",
    "datasets": "googlenet.data",
    "download": "googlenet.data.cifar",
    "listing": "googlenet.data.listing",
    "loader": "googlenet.data.loader",
    "shards": "googlenet.data.shards",
    "config": "googlenet.training.config",
    "distributed": "googlenet.training.distributed",
    "engine": "googlenet.training",  # split: its public names are the package's
    "finetune": "googlenet.training.finetune",
    "interrupt": "googlenet.training.interrupt",
    "logs": "googlenet.logs",
    "optim": "googlenet.training.optim",
    "runs": "googlenet.training.runs",
    "evaluate": "googlenet.infer.evaluate",
    "export": "googlenet.infer.export",
    "inference": "googlenet.infer.inference",
    "explain": "googlenet.insight",  # the package re-exports the old module's functions
    "report": "googlenet.insight.report",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `googlenet.<old>` and hands out the module it moved to (the same object)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(MOVED[spec.name.removeprefix(__name__ + ".")])
        spec.loader_state = module.__spec__  # stamped over next by the import system
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = module.__spec__.loader_state  # the real module keeps its own spec


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in MOVED:
        value = importlib.import_module(MOVED[name])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(MOVED))


__all__ = [
    "INCEPTION_TABLE",
    "VARIANTS",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "Prediction",
    "Predictor",
    "RunResult",
    "TrainConfig",
    "UserError",
    "VariantSpec",
    "build",
    "get_spec",
    "list_variants",
    "load",
    "resolve_config",
    "summary",
    "train",
]
__version__ = "0.1.0"
