"""Where and in what precision a model runs: device choice (auto: CUDA when available) and the
autocast dtype (bf16 on CPUs with AVX-512 bf16 and on GPUs that have it, fp16 otherwise on CUDA)."""

from __future__ import annotations

import contextlib
import ctypes
import os
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


def _libc() -> ctypes.CDLL | None:
    """glibc, or None elsewhere (musl has no libc.so.6; macOS and Windows no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


# What keep_freed_memory may keep: the resident size may grow to KEEP_SLACK x its size after
# the first step (the step's working set) before freed memory is handed back. Unbounded, the
# tutorial's batch of 256 at 224 px peaked at 5.0-9.2 GB instead of 4.0 GB (issue 22).
KEEP_SLACK = 1.25
_kept: dict[str, int] = {}  # "limit": the resident size (bytes) past which memory is trimmed


def keep_freed_memory() -> bool:
    """glibc: from now on freed memory stays in this process. Blocks past glibc's mmap
    threshold (32 MiB at most, adapting) otherwise go back to the OS on free, so each training
    step's large activations fault in fresh zeroed pages (~6% of a CPU step here: docs/
    results.md). Process-wide and lasting, like torch.set_num_threads; what is kept is bounded
    by `bound_kept_memory`, which the loops call after each step. Returns whether it applied
    (False off glibc)."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # no block by mmap; the heap's free top is kept (up to 2 GiB) instead of trimmed
    kept = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    if kept:
        _kept.clear()
        _kept["on"] = 1
    return kept


def resident_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def bound_kept_memory() -> bool:
    """After a step: the first call (once keep_freed_memory applied) sets the limit at
    KEEP_SLACK x the resident size, the step's working set included. A call past the limit
    hands freed memory back to the OS (malloc_trim), and the step after it, which allocates
    its working set afresh, may raise the limit (a larger crop stage), never lower it.
    Returns whether it trimmed."""
    if not _kept:
        return False
    rss = resident_bytes()
    if "limit" not in _kept or _kept.pop("rebase", 0):
        _kept["limit"] = max(_kept.get("limit", 0), int(rss * KEEP_SLACK))
        return False
    libc = _libc()
    if rss <= _kept["limit"] or libc is None:
        return False
    libc.malloc_trim(0)
    _kept["rebase"] = 1
    return True


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
