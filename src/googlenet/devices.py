"""Where and in what precision a model runs: device choice (auto: CUDA when available) and the
autocast dtype (bf16 on CPUs with AVX-512 bf16 and on GPUs that have it, fp16 otherwise on CUDA)."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable

import torch

from googlenet.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(
    name: str = "auto", index: int = 0, what: str = "config key 'device'"
) -> torch.device:
    """auto | cpu | cuda -> a torch.device (cuda:index modulo the GPUs present)."""
    if name not in DEVICES:
        raise UserError(f"{what}: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{what}: cuda requested but no CUDA GPU is available")
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX-512 bf16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(
    precision: str, device: torch.device, what: str = "config key 'precision'"
) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"{what}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"{what}: fp16 is for CUDA; use bf16 or fp32 on a CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def keep_freed_memory() -> bool:
    """glibc: from now on freed memory stays in this process. Blocks past glibc's mmap
    threshold (32 MiB at most, adapting) otherwise go back to the OS on free, so each training
    step's large activations fault in fresh zeroed pages (~6% of a CPU step here: docs/
    results.md). Process-wide and lasting, like torch.set_num_threads; the cost is a somewhat
    higher resident size. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # no block by mmap; the heap's free top is kept (up to 2 GiB) instead of trimmed
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for dtype, or a no-op context for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_runner(
    model: torch.nn.Module,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function: normalised N x 3 x S x S batch -> float32 logits (on the CPU), running the
    eval-mode model on `device` under autocast `dtype` (None: fp32), channels_last if asked."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=fmt)
    from googlenet import fastpool

    if fastpool.applies(device, dtype, channels_last):
        fastpool.use_fast_pool(model)  # as in training: the same outputs, bit for bit, sooner

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, dtype):
            return model(x).float().cpu()

    return run
