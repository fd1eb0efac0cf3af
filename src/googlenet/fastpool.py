"""The inception pool branch's 3x3/1 max-pool on bf16 channels-last CPU tensors, by a small C
kernel (fastpool.c) built on first use with the system C compiler and loaded with ctypes.

Same function as nn.MaxPool2d(3, 1, 1), bit for bit, outputs and gradients (same winners on
ties, NaN wins, gradients added in bf16 in ATen's order), so training is bit-identical with it.
Anything else (other dtypes or layouts, GPUs, TorchScript/ONNX tracing, torch.compile, no
compiler here) runs ATen's kernel, so the model and its checkpoints are unchanged.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

_SRC = Path(__file__).with_name("fastpool.c")
_state: dict[str, object] = {}
_lock = threading.Lock()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("GOOGLENET_CACHE") or Path(base) / "googlenet")


def _cpu_key() -> str:
    """What -march=native depends on: a library built for another CPU is never loaded."""
    try:
        flags = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not _SRC.is_file():
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + _cpu_key().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"fastpool-{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            for arch in (["-march=native"], []):  # some compilers lack -march=native
                cmd = [cc, "-O3", *arch, "-std=c99", "-shared", "-fPIC", str(_SRC), "-o", tmp]
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                    os.replace(tmp, lib)  # atomic: concurrent builders (DDP ranks) agree
                    break
            else:
                return None
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError:
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    for name in ("maxpool3_forward_bf16", "maxpool3_backward_bf16"):
        getattr(dll, name).argtypes = [p, p, p, i64, i64, i64, i64, i64]
        getattr(dll, name).restype = ctypes.c_int
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source and CPU, cached under ~/.cache/googlenet);
    None where no C compiler is present or the build fails. GOOGLENET_FAST_POOL=0 disables it."""
    with _lock:
        if "lib" not in _state:
            off = os.environ.get("GOOGLENET_FAST_POOL", "1") == "0"
            _state["lib"] = None if off else _build()
        return _state["lib"]  # type: ignore[return-value]


def _run(fn: ctypes._CFuncPtr, a: Tensor, b: Tensor | None, c: Tensor, shape: tuple) -> None:
    """Call `fn` over batch slices on torch's thread count (ctypes releases the GIL)."""
    n, h, w, ch = shape
    ptrs = [t.data_ptr() if t is not None else None for t in (a, b, c)]
    threads = max(1, min(torch.get_num_threads(), n))
    bounds = [n * i // threads for i in range(threads + 1)]

    def part(i: int) -> int:
        return fn(*ptrs, bounds[i], bounds[i + 1], h, w, ch)

    if threads == 1:
        codes = [part(0)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(part, range(threads)))
    if any(codes):
        raise MemoryError("fastpool: out of memory for a row buffer")


class _MaxPool3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: N x C x H x W, bf16, channels-last
        lib = library()
        n, ch, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        code = None
        if x.requires_grad:  # the winner's window position, one byte per output
            code = torch.empty((n, h, w, ch), dtype=torch.uint8)
        _run(lib.maxpool3_forward_bf16, x, y, code, (n, h, w, ch))
        ctx.save_for_backward(code)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> Tensor:
        lib = library()
        (code,) = ctx.saved_tensors
        gy = gy.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        n, ch, h, w = gy.shape
        gx = torch.empty_like(gy, memory_format=torch.channels_last)
        _run(lib.maxpool3_backward_bf16, gy, code, gx, (n, h, w, ch))
        return gx


def _usable(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and library() is not None
    )


class MaxPool3(nn.MaxPool2d):
    """nn.MaxPool2d(3, stride=1, padding=1), with the C kernel where it applies."""

    def __init__(self, ceil_mode: bool = False) -> None:
        super().__init__(3, stride=1, padding=1, ceil_mode=ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        if _usable(x):
            return _MaxPool3.apply(x)
        return super().forward(x)


def use_fast_pool(model: nn.Module) -> int:
    """Swap every 3x3/1 padding-1 nn.MaxPool2d in `model` (the inception pool branches) for
    MaxPool3, in place; returns how many. A no-op (0) where the kernel cannot be built."""
    if library() is None:
        return 0
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if (
                type(child) is nn.MaxPool2d
                and _pair(child.kernel_size) == (3, 3)
                and _pair(child.stride) == (1, 1)
                and _pair(child.padding) == (1, 1)
                and _pair(child.dilation) == (1, 1)
                and not child.return_indices
            ):
                setattr(parent, name, MaxPool3(ceil_mode=child.ceil_mode))
                swapped += 1
    return swapped


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)
