"""GoogLeNet / Inception v1: build, train, evaluate, export and serve."""

from googlenet.config import TrainConfig, resolve_config
from googlenet.engine import RunResult, train
from googlenet.errors import UserError
from googlenet.inference import Prediction, Predictor, load
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
