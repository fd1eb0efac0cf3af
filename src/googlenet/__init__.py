"""GoogLeNet / Inception v1: build, train, evaluate, export and serve."""

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

__all__ = [
    "INCEPTION_TABLE",
    "VARIANTS",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "UserError",
    "VariantSpec",
    "build",
    "get_spec",
    "list_variants",
    "summary",
]
__version__ = "0.1.0"
