"""torch.hub entry points: `torch.hub.load(REPO, "googlenet", source="local")`, or
`torch.hub.load("OWNER/googlenet", ...)` from GitHub. One entry point per variant:

    googlenet            torchvision's batch-norm GoogLeNet (variant "bn"), 1000 classes
    googlenet_bn         the same
    googlenet_paper      the 2014 network (LRN, true 5x5), 1000 classes
    googlenet_article    the Keras tutorial's network, 1000 classes
    googlenet_cifar      the 32x32-native network, 10 classes

Each takes pretrained=False, num_classes=None (the variant's own) and model options as
keywords (aux_logits=False, dropout=0.5, ...), and returns a googlenet.model.GoogLeNet.
pretrained=True (googlenet, googlenet_bn): torchvision's ImageNet weights, downloaded once into
$TORCH_HOME/hub/checkpoints (googlenet.weights); num_classes= then replaces the classifiers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

dependencies = ["torch"]

# This repository's own package, ahead of any installed copy: hub loads the code it was given.
_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from googlenet.errors import UserError  # noqa: E402
from googlenet.model import GoogLeNet, build  # noqa: E402


def _load(variant: str, pretrained: bool, num_classes: int | None, **kwargs: Any) -> GoogLeNet:
    if not pretrained:
        return build(variant, num_classes=num_classes, **kwargs)
    if variant != "bn" or kwargs:
        raise UserError(
            "pretrained=True: only googlenet / googlenet_bn have weights (torchvision's), "
            "taken as they are (num_classes= may still set a new classifier)"
        )
    from googlenet.checkpoint import load_model
    from googlenet.weights import pretrained as named_weights

    model, _ = load_model(named_weights("torchvision"))  # downloaded and converted once
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.train()  # as nn.Module and torch.hub hand models out


def googlenet(pretrained: bool = False, num_classes: int | None = None, **kwargs: Any) -> GoogLeNet:
    """torchvision's batch-norm GoogLeNet (variant "bn"; state_dict-compatible)."""
    return _load("bn", pretrained, num_classes, **kwargs)


def googlenet_bn(
    pretrained: bool = False, num_classes: int | None = None, **kwargs: Any
) -> GoogLeNet:
    """torchvision's batch-norm GoogLeNet (variant "bn"); the same as `googlenet`."""
    return _load("bn", pretrained, num_classes, **kwargs)


def googlenet_paper(
    pretrained: bool = False, num_classes: int | None = None, **kwargs: Any
) -> GoogLeNet:
    """The 2014 network: LRN, true 5x5 branches, no batch norm (variant "paper")."""
    return _load("paper", pretrained, num_classes, **kwargs)


def googlenet_article(
    pretrained: bool = False, num_classes: int | None = None, **kwargs: Any
) -> GoogLeNet:
    """The Keras tutorial's network: the paper's without LRN, Glorot init (variant "article")."""
    return _load("article", pretrained, num_classes, **kwargs)


def googlenet_cifar(
    pretrained: bool = False, num_classes: int | None = None, **kwargs: Any
) -> GoogLeNet:
    """The 32x32-native network for CIFAR-sized images (variant "cifar", 10 classes)."""
    return _load("cifar", pretrained, num_classes, **kwargs)
