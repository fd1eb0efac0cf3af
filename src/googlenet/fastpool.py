"""GoogLeNet's 3x3 max-pools (the inception pool branches' 3x3/1, the stages' 3x3/2) on bf16
channels-last CPU tensors, by a small C kernel (fastpool.c) built on first use with the system
C compiler and loaded with ctypes.

Same function as nn.MaxPool2d(3, stride, padding, ceil_mode=...), bit for bit, outputs and
gradients (same winners on ties, NaN wins, gradients added in bf16 in ATen's order), so
training is bit-identical with it.
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
from pathlib import Path

import torch
from torch import Tensor, nn

from googlenet.errors import UserError

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


def _gomp_files() -> set[str]:
    """The distinct libgomp files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {ln.split()[-1] for ln in maps.splitlines() if "/libgomp" in ln}


def _compile(cc: str, openmp: bool) -> Path | None:
    """The kernel built for this CPU (cached per source, CPU and OpenMP choice), or None."""
    src = _SRC.read_bytes() + b"openmp" * openmp
    key = hashlib.sha256(src + _cpu_key().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"fastpool-{key}.so"
    if lib.is_file():
        return lib
    try:  # an unwritable cache (read-only home, container) means ATen's pool, not a crash
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
    except OSError:
        return None
    try:
        # without OpenMP the kernel runs on the calling thread; some compilers lack
        # -march=native
        tries = [["-march=native"], []]
        for flags in [["-fopenmp", "-march=native"]] * openmp + tries:
            cmd = [cc, "-O3", *flags, "-std=c99", "-shared", "-fPIC", str(_SRC), "-o", tmp]
            if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                os.replace(tmp, lib)  # atomic: concurrent builders (DDP ranks) agree
                return lib
        return None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not _SRC.is_file():
        return None
    # OpenMP only where torch runs on it: the library then shares torch's libgomp.so.1
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    before = _gomp_files()
    lib = _compile(cc, openmp)
    try:
        dll = ctypes.CDLL(str(lib)) if lib is not None else None
        if dll is not None and openmp and _gomp_files() - before:
            # a libgomp of its own came in (torch's runtime has another name, or is not
            # libgomp): its threads would fight torch's, so run on the calling thread instead
            lib = _compile(cc, False)
            dll = ctypes.CDLL(str(lib)) if lib is not None else None
    except OSError:
        return None
    if dll is None:
        return None
    _state["path"] = lib
    i64, p = ctypes.c_int64, ctypes.c_void_p
    for name in ("maxpool3_forward_bf16", "maxpool3_backward_bf16"):
        getattr(dll, name).argtypes = [p, p, p, *[i64] * 8]
        getattr(dll, name).restype = None
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source and CPU, cached in $GOOGLENET_CACHE, else
    ~/.cache/googlenet); None where no C compiler is present or the build fails.
    GOOGLENET_FAST_POOL=0 disables it."""
    with _lock:
        if "lib" not in _state:
            off = os.environ.get("GOOGLENET_FAST_POOL", "1") == "0"
            _state["lib"] = None if off else _build()
        return _state["lib"]  # type: ignore[return-value]


def build_kernel() -> Path:
    """Build the kernel for this CPU into the cache now (or find it there) and return its path:
    for images made for a known CPU, so the first run does not compile. UserError where it
    cannot be built."""
    if os.environ.get("GOOGLENET_FAST_POOL", "1") == "0":
        raise UserError("GOOGLENET_FAST_POOL=0 turns the max-pool kernel off; unset it to build")
    with _lock:
        dll = _build()  # always into today's cache, whatever an earlier library() loaded
        if dll is None:
            raise UserError(
                f"could not build the max-pool kernel into {_cache_dir()}: no C compiler "
                "($CC, cc or gcc), the compile failed or the folder is not writable; "
                "max-pools run ATen's kernel"
            )
        _state["lib"] = dll
        return Path(_state["path"])  # type: ignore[arg-type]


def _run(fn: ctypes._CFuncPtr, a: Tensor, b: Tensor | None, c: Tensor, sizes: tuple) -> None:
    """Call `fn` (it shares the rows out over torch's OpenMP threads; ctypes drops the GIL)."""
    fn(*[t.data_ptr() if t is not None else None for t in (a, b, c)], *sizes)


def _out_size(size: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """ATen's pooling output size for a 3-wide window (ceil_mode: a last window may start in
    the image's last stride, never in the right padding)."""
    out = (size + 2 * padding - 3 + (stride - 1 if ceil_mode else 0)) // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


class _MaxPool3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...]) -> Tensor:  # x: bf16, channels-last
        # sizes: H, W, C, OH, OW, stride, padding
        lib = library()
        n, ch = x.shape[:2]
        oh, ow = sizes[3:5]
        y = torch.empty((n, oh, ow, ch), dtype=x.dtype).permute(0, 3, 1, 2)  # channels-last
        code = None
        if x.requires_grad:  # the winner's window position, one byte per output
            code = torch.empty((n, oh, ow, ch), dtype=torch.uint8)
        _run(lib.maxpool3_forward_bf16, x, y, code, (n, *sizes))
        ctx.save_for_backward(code)
        ctx.sizes = sizes
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor, None]:
        lib = library()
        (code,) = ctx.saved_tensors
        gy = gy.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        n, ch = gy.shape[:2]
        h, w = ctx.sizes[:2]
        gx = torch.empty((n, h, w, ch), dtype=gy.dtype).permute(0, 3, 1, 2)
        _run(lib.maxpool3_backward_bf16, gy, code, gx, (n, *ctx.sizes))
        return gx, None


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
    """nn.MaxPool2d(3, stride, padding, ceil_mode=...), with the C kernel where it applies."""

    def __init__(self, stride: int = 1, padding: int = 1, ceil_mode: bool = False) -> None:
        if padding not in (0, 1) or stride < 1:
            raise ValueError(f"MaxPool3 takes stride >= 1, padding 0 or 1; got {stride}, {padding}")
        super().__init__(3, stride=stride, padding=padding, ceil_mode=ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        if _usable(x):
            s, p = _pair(self.stride)[0], _pair(self.padding)[0]
            h, w = x.shape[2:]
            oh, ow = (_out_size(v, s, p, self.ceil_mode) for v in (h, w))
            if oh > 0 and ow > 0:  # else ATen says what is wrong
                return _MaxPool3.apply(x, (h, w, x.shape[1], oh, ow, s, p))
        return super().forward(x)


def applies(device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> bool:
    """Whether a model run on `device` under autocast `dtype` in this layout feeds its pools
    the kernel's case (bf16 channels-last CPU tensors), so that swapping them in pays."""
    return device.type == "cpu" and dtype is torch.bfloat16 and channels_last


def use_fast_pool(model: nn.Module) -> int:
    """Swap every 3x3 nn.MaxPool2d in `model` with one stride and padding 0 or 1 (the
    inception pool branches' 3x3/1, the stage pools' 3x3/2) for MaxPool3, in place; returns
    how many. A no-op (0) where the kernel cannot be built."""
    if library() is None:
        return 0
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if (
                type(child) is nn.MaxPool2d
                and _pair(child.kernel_size) == (3, 3)
                and len(set(_pair(child.stride))) == 1
                and _pair(child.padding) in ((0, 0), (1, 1))
                and _pair(child.dilation) == (1, 1)
                and not child.return_indices
            ):
                s, p = _pair(child.stride)[0], _pair(child.padding)[0]
                setattr(parent, name, MaxPool3(s, p, ceil_mode=child.ceil_mode))
                swapped += 1
    return swapped


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)
