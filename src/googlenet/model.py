"""GoogLeNet / Inception v1 ("Going deeper with convolutions", Szegedy et al., 2014).

One network class, configured by a `VariantSpec`, and a small registry of the variants
that matter: the 2014 `paper` network, the Keras tutorial's `article` network, torchvision's
batch-norm `bn` network (state_dict-compatible) and a 32x32-native `cifar` network.

Attribute names follow the paper's Table 1 and torchvision (conv1 ... inception5b, aux1/aux2,
fc) so that torchvision's weights load with strict=True into `bn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.errors import UserError
from googlenet.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

# Paper, Table 1: (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
# A max-pool 3x3/2 precedes 4a and 5a (maxpool3, maxpool4).
INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("3a", 64, 96, 128, 16, 32, 32),
    ("3b", 128, 128, 192, 32, 96, 64),
    ("4a", 192, 96, 208, 16, 48, 64),
    ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64),
    ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128),
    ("5a", 256, 160, 320, 32, 128, 128),
    ("5b", 384, 192, 384, 48, 128, 128),
)


# Every top-level block before the heads, in forward order (lrn1/lrn2: paper variant only).
BLOCKS = (
    "conv1", "maxpool1", "lrn1", "conv2", "conv3", "lrn2", "maxpool2",
    "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip
HEADS = ("fc", "aux1", "aux2")  # the classifier heads, in the order train() returns them
AUX_TAPS = {"aux1": "inception4a", "aux2": "inception4d"}  # the block each aux head reads
HEAD_PREFIXES = ("", "aux1_", "aux2_")  # metric and log column prefix of each head in HEADS


class GoogLeNetOutputs(NamedTuple):
    """What a GoogLeNet returns in train() mode. aux1/aux2 are None when the heads are off."""

    logits: Tensor
    aux1: Tensor | None
    aux2: Tensor | None


@dataclass(frozen=True)
class VariantSpec:
    name: str
    description: str
    input_size: int  # the side of the square image the variant was designed for
    min_input_size: int  # smallest side the forward accepts (checked, with a clear error)
    num_classes: int = 1000
    stem: str = (
        "imagenet"  # "imagenet": 7x7/2 conv + 2 max-pools; "cifar": 3x3/1 convs + 1 max-pool
    )
    batch_norm: bool = False  # conv without bias + BatchNorm(eps=1e-3), as torchvision
    lrn: bool = False  # LocalResponseNorm(5, 1e-4, 0.75) after maxpool1 and after conv3
    ceil_mode: bool = False  # max-pools round up (torchvision) instead of padding by 1 (paper)
    branch3_kernel: int = 5  # the "5x5" branch; torchvision keeps a 3x3 here (a known bug)
    maxpool4_kernel: int = 3  # torchvision uses 2x2/2 before 5a
    aux_pool: int = 0  # 0: paper's AvgPool 5x5/3; k > 0: AdaptiveAvgPool to k x k
    aux_logits: bool = True  # build aux1/aux2 heads (off: no parameters at all)
    dropout: float = 0.4  # before the final classifier
    aux_dropout: float = 0.7  # inside the aux heads
    init: str = "xavier"  # "xavier" | "article" (glorot + bias 0.2) | "trunc_normal" | "kaiming"
    transform_input: bool = False  # torchvision: ImageNet-normalised input -> (x - 0.5) / 0.5


VARIANTS: dict[str, VariantSpec] = {
    "paper": VariantSpec(
        name="paper",
        description="The 2014 network: LRN, true 5x5, no batch norm, dropout 0.4/0.7.",
        input_size=224,
        min_input_size=32,
        lrn=True,
        init="xavier",
    ),
    "article": VariantSpec(
        name="article",
        description="The Keras tutorial's network: the paper's without LRN, Glorot init, bias 0.2.",
        input_size=224,
        min_input_size=32,
        init="article",
    ),
    "bn": VariantSpec(
        name="bn",
        description="torchvision's batch-norm GoogLeNet, state_dict-compatible.",
        input_size=224,
        min_input_size=32,
        batch_norm=True,
        ceil_mode=True,
        branch3_kernel=3,
        maxpool4_kernel=2,
        aux_pool=4,
        dropout=0.2,
        init="trunc_normal",
    ),
    "cifar": VariantSpec(
        name="cifar",
        description="32x32-native: 3x3/1 stem, stages 3/4/5 at 16/8/4, batch norm.",
        input_size=32,
        min_input_size=16,
        num_classes=10,
        stem="cifar",
        batch_norm=True,
        aux_pool=2,
        dropout=0.2,
        init="kaiming",
    ),
}


# What each variant's input is normalised with and what fraction of the resized image its
# validation crop keeps (ImageNet's 224 of 256; CIFAR's 32-px images are used whole).
DESIGN_DATA: dict[str, tuple[tuple[float, ...], tuple[float, ...], float]] = {
    "paper": (IMAGENET_MEAN, IMAGENET_STD, 0.875),
    "article": (IMAGENET_MEAN, IMAGENET_STD, 0.875),
    "bn": (IMAGENET_MEAN, IMAGENET_STD, 0.875),
    "cifar": (CIFAR10_MEAN, CIFAR10_STD, 1.0),
}


def list_variants() -> list[str]:
    """Names of the registered variants."""
    return list(VARIANTS)


def get_spec(name: str, **overrides: object) -> VariantSpec:
    """The spec of a registered variant, with fields overridden (e.g. num_classes=10)."""
    if name not in VARIANTS:
        raise UserError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    fields = VariantSpec.__dataclass_fields__
    for key in overrides:
        if key not in fields or key == "name":
            raise UserError(f"unknown model option {key!r} for variant {name!r}")
    return replace(VARIANTS[name], **{k: v for k, v in overrides.items() if v is not None})


def build(name: str, num_classes: int | None = None, **overrides: object) -> GoogLeNet:
    """Build a registered variant, e.g. build("article", num_classes=10)."""
    return GoogLeNet(get_spec(name, num_classes=num_classes, **overrides))


class BasicConv2d(nn.Module):
    """conv + (BatchNorm) + ReLU; `conv`/`bn` names match torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, *, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """Four parallel branches, concatenated on channels (paper, Figure 2b)."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        *,
        bn: bool,
        ceil_mode: bool,
        branch3_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1, bn=bn)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, 1, bn=bn), BasicConv2d(ch3x3red, ch3x3, 3, bn=bn)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, 1, bn=bn),
            BasicConv2d(ch5x5red, ch5x5, branch3_kernel, bn=bn),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=ceil_mode),
            BasicConv2d(in_channels, pool_proj, 1, bn=bn),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (paper, section 5): pool, 1x1 conv 128, FC 1024, dropout, linear."""

    def __init__(
        self, in_channels: int, num_classes: int, *, bn: bool, pool: int, dropout: float
    ) -> None:
        super().__init__()
        # pool == 0: the paper's 5x5/3 average pool (14x14 -> 4x4 at 224 input).
        self.pool: nn.Module = (
            nn.AvgPool2d(5, stride=3) if pool == 0 else nn.AdaptiveAvgPool2d(pool)
        )
        side = 4 if pool == 0 else pool
        self.conv = BasicConv2d(in_channels, 128, 1, bn=bn)
        self.fc1 = nn.Linear(128 * side * side, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.pool(x))  # N x 128 x 4 x 4 (224 input)
        x = F.relu(self.fc1(torch.flatten(x, 1)), inplace=True)  # N x 1024
        return self.fc2(self.dropout(x))  # N x num_classes


class GoogLeNet(nn.Module):
    """GoogLeNet. train(): GoogLeNetOutputs(logits, aux1, aux2); eval(): logits only."""

    def __init__(self, spec: VariantSpec) -> None:
        super().__init__()
        self.spec = spec
        bn, ceil = spec.batch_norm, spec.ceil_mode
        # Paper pools "3x3/2" with padding so 112 -> 56 -> 28 -> 14 -> 7; torchvision gets the
        # same sizes with ceil_mode=True and no padding.
        pad = 0 if ceil else 1

        def maxpool(k: int = 3) -> nn.MaxPool2d:
            return nn.MaxPool2d(k, stride=2, padding=pad if k == 3 else 0, ceil_mode=ceil)

        if spec.stem == "imagenet":
            self.conv1 = BasicConv2d(3, 64, 7, stride=2, bn=bn)  # N x 64 x 112 x 112
            self.maxpool1: nn.Module = maxpool()  # N x 64 x 56 x 56
            self.lrn1: nn.Module | None = nn.LocalResponseNorm(5, 1e-4, 0.75) if spec.lrn else None
        elif spec.stem == "cifar":
            self.conv1 = BasicConv2d(3, 64, 3, stride=1, bn=bn)  # N x 64 x 32 x 32
            self.maxpool1 = nn.Identity()  # no downsampling before conv3 at 32x32
            self.lrn1 = None
        else:
            raise UserError(f"unknown stem {spec.stem!r}; expected 'imagenet' or 'cifar'")
        self.conv2 = BasicConv2d(64, 64, 1, bn=bn)  # 3x3 reduce
        self.conv3 = BasicConv2d(64, 192, 3, bn=bn)  # N x 192 x 56 x 56 (cifar: 32 x 32)
        self.lrn2: nn.Module | None = nn.LocalResponseNorm(5, 1e-4, 0.75) if spec.lrn else None
        self.maxpool2 = maxpool()  # N x 192 x 28 x 28 (cifar: 16 x 16)

        channels = 192
        blocks: dict[str, Inception] = {}
        for name, *widths in INCEPTION_TABLE:
            blocks[name] = Inception(
                channels, *widths, bn=bn, ceil_mode=ceil, branch3_kernel=spec.branch3_kernel
            )
            channels = blocks[name].out_channels
        # Registered in torchvision's order so state_dict keys come out in the same order.
        self.inception3a = blocks["3a"]  # N x 256 x 28 x 28
        self.inception3b = blocks["3b"]  # N x 480 x 28 x 28
        self.maxpool3 = maxpool()  # N x 480 x 14 x 14
        self.inception4a = blocks["4a"]  # N x 512 x 14 x 14
        self.inception4b = blocks["4b"]  # N x 512 x 14 x 14
        self.inception4c = blocks["4c"]  # N x 512 x 14 x 14
        self.inception4d = blocks["4d"]  # N x 528 x 14 x 14
        self.inception4e = blocks["4e"]  # N x 832 x 14 x 14
        self.maxpool4 = maxpool(spec.maxpool4_kernel)  # N x 832 x 7 x 7
        self.inception5a = blocks["5a"]  # N x 832 x 7 x 7
        self.inception5b = blocks["5b"]  # N x 1024 x 7 x 7

        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if spec.aux_logits:
            kw = dict(bn=bn, pool=spec.aux_pool, dropout=spec.aux_dropout)
            self.aux1 = InceptionAux(512, spec.num_classes, **kw)  # on 4a
            self.aux2 = InceptionAux(528, spec.num_classes, **kw)  # on 4d
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # N x 1024 x 1 x 1
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(1024, spec.num_classes)
        init_weights(self, spec.init)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def check_input(self, x: Tensor) -> None:
        """Raise a clear UserError for input this network cannot take."""
        if not isinstance(x, Tensor):
            raise UserError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise UserError(f"expected a 4-D tensor N x 3 x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise UserError(
                f"expected 3 input channels (N x 3 x H x W), got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if min(h, w) < self.spec.min_input_size:
            raise UserError(
                f"input {h}x{w} is smaller than the {self.spec.min_input_size}x"
                f"{self.spec.min_input_size} that variant {self.spec.name!r} supports"
            )
        # The paper's aux FC is sized for a 4x4 pool of a 14x14 map; 4a sees ceil(side/16),
        # and AvgPool 5x5/3 gives 4x4 for maps of 14..16, i.e. sides 209..256.
        fixed_aux = self.training and self.aux1 is not None and self.spec.aux_pool == 0
        if fixed_aux and not (209 <= h <= 256 and 209 <= w <= 256):
            raise UserError(
                f"input {h}x{w}: variant {self.spec.name!r} with aux heads trains on sides "
                "209..256 (224 by design); use aux_logits=False or eval() for other sizes"
            )

    def _transform_input(self, x: Tensor) -> Tensor:
        # torchvision's ported weights expect (x - 0.5) / 0.5 per channel, not ImageNet stats.
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x * std + mean - 0.5) / 0.5

    def _body(self, x: Tensor, aux: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The feature map after inception5b, and the aux heads' logits (when `aux`)."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self.check_input(x)
        if self.spec.transform_input:
            x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        if self.lrn1 is not None:
            x = self.lrn1(x)
        x = self.conv3(self.conv2(x))
        if self.lrn2 is not None:
            x = self.lrn2(x)
        x = self.maxpool2(x)
        x = self.inception3b(self.inception3a(x))
        x = self.inception4a(self.maxpool3(x))
        aux1 = self.aux1(x) if aux and self.aux1 is not None else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if aux and self.aux2 is not None else None
        x = self.inception4e(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))  # N x 1024 x H/32 x W/32
        return x, aux1, aux2

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, N x 1024 x H x W (timm's convention); no aux heads."""
        return self._body(x, aux=False)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits: global average pool, dropout, fc. pre_logits: stop before
        fc and return the pooled N x 1024 features (after dropout, as timm does)."""
        x = torch.flatten(self.avgpool(x), 1)  # N x 1024
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)  # N x num_classes

    def forward(self, x: Tensor) -> GoogLeNetOutputs | Tensor:
        # The aux heads run mid-body, before the head's dropout: the random draws keep the
        # order they always had, so a seeded run gives the same numbers.
        x, aux1, aux2 = self._body(x, aux=self.training)
        logits = self.forward_head(x)
        if self.training:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits

    def reset_classifier(self, num_classes: int) -> None:
        """New fc and aux-head output layers for `num_classes`, initialised as the variant
        initialises them (timm's convention; the aux heads too, so they train on the new
        classes). The rest of the network is kept."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(
                f"reset_classifier: num_classes must be a positive integer, got {num_classes!r} "
                "(pooled features: forward_head(x, pre_logits=True))"
            )
        old = self.fc.weight
        self.fc = nn.Linear(1024, num_classes).to(old.device, old.dtype)
        init_weights(self.fc, self.spec.init)
        for head in (self.aux1, self.aux2):
            if head is not None:
                head.fc2 = nn.Linear(1024, num_classes).to(old.device, old.dtype)
                init_weights(head.fc2, self.spec.init)
        self.spec = replace(self.spec, num_classes=num_classes)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """What the network expects, with timm's keys: transforms.Preprocess.from_cfg builds
        the validation preprocessing from it."""
        spec = self.spec
        mean, std, crop_pct = DESIGN_DATA.get(spec.name, DESIGN_DATA["bn"])
        return {
            "architecture": f"googlenet_{spec.name}",
            "input_size": (3, spec.input_size, spec.input_size),
            "min_input_size": (3, spec.min_input_size, spec.min_input_size),
            "mean": tuple(mean),
            "std": tuple(std),
            "interpolation": "bilinear",  # antialiased when shrinking, as transforms.resample
            "crop_pct": crop_pct,
            "num_classes": spec.num_classes,
            "first_conv": "conv1.conv",
            "classifier": "fc",
        }


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv/linear weights by scheme; BatchNorm to (1, 0); seeded by torch."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme in ("xavier", "article"):
                # Keras' glorot_uniform; the paper does not state its initialisation.
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.2 if scheme == "article" else 0.0)
            elif scheme == "trunc_normal":
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif scheme == "kaiming":
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    bound = 1 / math.sqrt(m.weight.shape[1])
                    nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            else:
                raise UserError(f"unknown init scheme {scheme!r}")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
