"""Helpers shared by the Triton kernels: interpreter detection, launch configs, dot precision, NVTX, checks.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the mode is fixed at import time; the host
wrappers re-check it at call time only to give a clear error for CPU tensors.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .. import functional
from ..functional import acc_dtype
from . import interpreter_compat

INTERPRET_ENV_VAR = "TRITON_INTERPRET"
# Fixed when this module (hence every kernel) is imported; see the module docstring.
INTERPRETED = os.environ.get(INTERPRET_ENV_VAR) == "1"
if INTERPRETED:
    interpreter_compat.apply()  # older Triton interpreters on NumPy >= 2.4 (see interpreter_compat)

DOT_PRECISIONS = ("ieee", "tf32")
# Passed at every launch (and by aot_check). Triton 3.9 warns when a kernel leaves floating-point fusion (a*b + c
# contracted into one FMA) to its default, and says Triton 3.10 turns that default off. Every earlier release
# compiled these kernels with fusion on (the GEMM epilogues: lam's scaling, the bias): ask for it, so that a
# Triton with the new default compiles them as before. TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is requested now (the variable as currently set)."""
    return os.environ.get(INTERPRET_ENV_VAR) == "1"


def check_runnable(*tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and that device can run the kernels; returns the device.

    CPU tensors run only under the interpreter, and only if it was on when the kernels were decorated.
    """
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"mixed devices: {device} and {t.device}; every tensor must be on one device")
    if device.type == "cpu":
        if not (interpreter_enabled() and INTERPRETED):
            raise RuntimeError("the Triton kernels got CPU tensors: CPU runs need Triton's interpreter, so set "
                               "TRITON_INTERPRET=1 before importing qrlora_kernels (or use CUDA tensors)")
    elif device.type != "cuda":
        raise ValueError(f"the Triton kernels run on CUDA (or CPU under the interpreter), got device {device}")
    return device


def dot_precision(dtype: torch.dtype, requested: str | None = None) -> str:
    """``input_precision`` for ``tl.dot``: only float32 operands have a choice.

    float32 follows ``torch.backends.cuda.matmul.allow_tf32`` unless ``requested`` says otherwise; the
    interpreter computes in numpy, so it is always "ieee" there.
    """
    if requested is not None and requested not in DOT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {DOT_PRECISIONS} or None, got {requested!r}")
    if INTERPRETED or dtype != torch.float32:
        return "ieee"
    if requested is not None:
        return requested
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# float64 for float64 inputs, else float32: the rule functional's pure-torch path follows too.
accumulator_dtype = acc_dtype


def check_float(name: str, t: torch.Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                *, in_dot: bool = True):
    """A floating tensor of an allowed dtype; one that enters a ``tl.dot`` (``in_dot``) may be float64 only where
    Triton has a float64 dot (not 3.2 to 3.4, torch 2.6 to 2.8: their own error, "Unsupported lhs dtype fp64",
    names no way out)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in allowed)}")
    if in_dot and not functional.triton_dot_takes(t.dtype):
        release = ".".join(map(str, functional.TRITON_RELEASE or ()))
        raise TypeError(f"{name} is float64, but Triton {release} has no float64 tl.dot; use the pure-torch twins in "
                        f"qrlora_kernels.kernels.reference (or qrlora_linear with backend='torch')")


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_size(what: str, name_a: str, size_a: int, name_b: str, size_b: int) -> None:
    if size_a != size_b:
        raise ValueError(f"{what} mismatch: {name_a} is {size_a} but {name_b} is {size_b}")


def check_matmul_operands(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """The two operands of ``a @ b``: floating point, 2-D, matching inner sizes and one dtype."""
    for name, t in ((name_a, a), (name_b, b)):
        check_float(name, t)
        check_2d(name, t)
    check_size("inner dimension", f"{name_a}.shape[1]", a.shape[1], f"{name_b}.shape[0]", b.shape[0])
    if a.dtype != b.dtype:
        raise TypeError(f"mixed dtypes: {name_a} is {a.dtype} but {name_b} is {b.dtype}")


def check_out(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A preallocated output with the right shape, dtype and device, or a fresh one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")
    return out


class _NvtxRange:
    """range_push/range_pop as a plain context manager: it opens around every kernel launch and op, and
    costs a third of the host time of torch.cuda.nvtx.range (a generator-based one)."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str, device: torch.device):
    """An NVTX range for Nsight on CUDA; a free no-op elsewhere."""
    if device.type == "cuda":
        return _NvtxRange(name)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- launch configurations

def _config(bm, bn, bk, group_m, stages, warps, **flags):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, **flags},
                         num_stages=stages, num_warps=warps)


def _tiled(config):
    """A GEMM config of ``lowrank_matmul``'s classic variant: one program per output tile, pointer loads."""
    return triton.Config(dict(config.kwargs, USE_TMA=False, PERSISTENT=False),
                         num_stages=config.num_stages, num_warps=config.num_warps)


# A handful in the spirit of Triton tutorial 03 and LoRAFusion (BM128 BN256 BK64 GROUP_M 8, 4 stages, 8 warps
# on H100); the smaller tiles cover skinny T and A100's smaller shared memory.
_GPU_GEMM_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8),
    _config(128, 256, 64, 8, 4, 8),
    _config(256, 128, 64, 8, 3, 8),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 128, 32, 8, 4, 4),
    _config(64, 128, 64, 8, 4, 4),
    _config(64, 64, 64, 8, 4, 4),
    _config(32, 64, 64, 8, 5, 2),
    _config(16, 128, 64, 8, 4, 4),  # decode-sized T: tl.dot's smallest M tile
]

# sm_90 only (Triton tutorial 09's persistent TMA matmul): one program per SM loops over output tiles, and the
# K-loop's a/b tiles arrive by TMA (tl.make_tensor_descriptor) instead of pointer loads. The autotuner times
# them beside the classic configs, so they are used only where they pay; `prune_gemm` offers them only when
# the operands suit TMA (see `tma_operands`).
_GPU_TMA_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8, USE_TMA=True, PERSISTENT=True),
    _config(128, 128, 64, 8, 4, 8, USE_TMA=True, PERSISTENT=True),
    _config(128, 128, 128, 8, 3, 8, USE_TMA=True, PERSISTENT=True),
    _config(128, 64, 64, 8, 4, 4, USE_TMA=True, PERSISTENT=True),
    # Fewer tokens (prune_by_size keeps 64-row tiles for T <= 64), and float32, whose tiles are twice as big:
    # the configs above need more than sm_90's 227 KiB of shared memory for it.
    _config(64, 128, 32, 8, 3, 4, USE_TMA=True, PERSISTENT=True),
    _config(64, 64, 32, 8, 3, 4, USE_TMA=True, PERSISTENT=True),
]

# Projections produce r columns, often few: narrower N tiles so small r does not waste a 256-wide tile.
_GPU_PROJECT_CONFIGS = [
    _config(128, 64, 64, 8, 4, 4),
    _config(128, 128, 64, 8, 4, 8),
    _config(64, 64, 64, 8, 4, 4),
    _config(64, 32, 64, 8, 4, 2),
    _config(32, 32, 64, 8, 5, 2),
    _config(256, 64, 32, 8, 3, 8),
]

# Under the interpreter autotuning would run every config, so there is exactly one, small enough that the
# tests' odd dims span several tiles (and tl.dot's 16 minimum holds).
_INTERPRETER_CONFIG = [_config(32, 32, 16, 2, 1, 1)]

# QRLORA_AUTOTUNE=0: one mid-size config per kernel on a GPU, so that Triton neither compiles nor times a sweep
# per new autotune key (about 1.5 s a config: a test run over many shapes would spend minutes tuning). With a
# single config the autotuner launches it directly. The tiles fit float32 in sm_80's and sm_90's shared memory
# (4 stages of 128x32 + 32x128 fp32 tiles: 128 KiB); no TMA config, unless a test swaps the list in.
AUTOTUNE_ENV_VAR = "QRLORA_AUTOTUNE"
AUTOTUNE = os.environ.get(AUTOTUNE_ENV_VAR, "1") != "0"  # read once: configs are fixed when kernels are decorated
_FIXED_GEMM_CONFIG = [_config(128, 128, 32, 8, 4, 4)]
_FIXED_PROJECT_CONFIG = [_config(64, 64, 64, 8, 4, 4)]


def token_bucket(tokens: int) -> int:
    """Autotune key for a token count: the next power of two, so that every new sequence length in training
    does not trigger a fresh autotuning sweep (the kernels take it as an otherwise unused argument)."""
    return triton.next_power_of_2(max(int(tokens), 1))


def prune_by_size(rows_arg: str, cols_arg: str):
    """An ``early_config_prune`` dropping tiles far larger than the output (e.g. 128-row tiles for one decode
    token): fewer configs to compile and time on the first call. Keeps at least the smallest config."""
    def prune(configs, named_args, **kwargs):
        rows = triton.next_power_of_2(max(int(named_args[rows_arg]), 1))
        cols = triton.next_power_of_2(max(int(named_args[cols_arg]), 1))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, rows) and c.kwargs["BLOCK_N"] <= max(32, cols)]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]
    return prune


def _autotuning(autotune: bool | None) -> bool:
    return AUTOTUNE if autotune is None else autotune


def gemm_configs(autotune: bool | None = None):
    """``merged_weight``'s configs (``autotune``: default ``AUTOTUNE``, from QRLORA_AUTOTUNE)."""
    if INTERPRETED:
        return _INTERPRETER_CONFIG
    return _GPU_GEMM_CONFIGS if _autotuning(autotune) else _FIXED_GEMM_CONFIG


def lowrank_gemm_configs(autotune: bool | None = None):
    """``lowrank_matmul``'s configs: the classic ones, plus the persistent TMA ones on a GPU (one classic
    config when autotuning is off)."""
    if INTERPRETED:
        return [_tiled(c) for c in _INTERPRETER_CONFIG]
    if not _autotuning(autotune):
        return [_tiled(c) for c in _FIXED_GEMM_CONFIG]
    return [_tiled(c) for c in _GPU_GEMM_CONFIGS] + _GPU_TMA_CONFIGS


def prune_gemm(rows_arg: str, cols_arg: str):
    """``prune_by_size``, and the TMA configs dropped unless the launch says its operands suit TMA
    (``TMA_OK``, part of the autotune key, so a cached TMA choice is never reused for other operands)."""
    by_size = prune_by_size(rows_arg, cols_arg)

    def prune(configs, named_args, **kwargs):
        if not named_args.get("TMA_OK"):
            configs = [c for c in configs if not c.kwargs.get("USE_TMA")]
            if not configs:
                raise ValueError("only TMA configs are left, but the operands do not suit TMA")
        return by_size(configs, named_args, **kwargs)
    return prune


# ---------------------------------------------------------------- TMA (sm_90)

_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tma_matrix(t: torch.Tensor, contiguous_dim: int) -> bool:
    """A 2-D operand a TMA descriptor can address: non-empty, unit stride along ``contiguous_dim``, the other
    stride at least a row (no broadcast or overlapping rows), and it and the base address 16-byte aligned
    (``tl.make_tensor_descriptor``'s rules)."""
    other = 1 - contiguous_dim
    return (t.numel() > 0 and t.stride(contiguous_dim) == 1 and t.stride(other) >= t.shape[contiguous_dim]
            and (t.stride(other) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


# Triton releases before device-side tensor descriptors (3.2 and 3.3, torch 2.6's and 2.7's) never take the TMA
# configs.
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
TMA_ENV_VAR = "QRLORA_TMA"  # "0" turns the TMA configs off (e.g. to rule them out when chasing a problem)

@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _properties(device: torch.device):
    """The CUDA device's properties (capability, SM count), read once per device: launches ask every call."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def tma_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, bool]:
    """(whether ``a @ b`` can load its tiles by TMA, whether ``b`` is K-major).

    TMA needs a GPU of compute capability 9.0 or newer (or the interpreter, for tests), a 16- or 32-bit float
    dtype, ``a`` row-major and ``b`` either row-major (``dY @ W0``) or K-major (``x @ W0^T``, a transposed view
    of a row-major weight).
    ``QRLORA_TMA=0`` in the environment turns it off, and so does a Triton without tensor descriptors.
    """
    b_k_major = b.stride(0) == 1 and b.stride(1) != 1
    if a.dtype not in _TMA_DTYPES or os.environ.get(TMA_ENV_VAR) == "0" or not HAS_TENSOR_DESCRIPTORS:
        return False, b_k_major
    if a.is_cuda:
        if _properties(a.device).major < 9:
            return False, b_k_major
    elif not INTERPRETED:
        return False, b_k_major
    ok = _tma_matrix(a, 1) and _tma_matrix(b, 0 if b_k_major else 1)
    return ok, b_k_major


def num_programs(device: torch.device) -> int:
    """Programs of a persistent kernel: one per SM (a fixed 4 under the interpreter)."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 4


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def ensure_tma_allocator() -> None:
    """Kernels that build TMA descriptors on the device need Triton's scratch allocator. Set one that uses
    torch's caching allocator, unless the caller has set their own. Triton keeps it in a ContextVar, which a
    new thread (autograd's backward thread among them) does not inherit, so this runs before every launch."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton without this layout: set ours
        pass
    triton.set_allocator(_scratch)


def project_configs(autotune: bool | None = None):
    if INTERPRETED:
        return _INTERPRETER_CONFIG
    return _GPU_PROJECT_CONFIGS if _autotuning(autotune) else _FIXED_PROJECT_CONFIG
