"""Projections onto the frozen basis, with the dlam reduction fused into the backward one.

* ``project(a, basis)``: ``P = a @ basis`` stored in float32. Forward ``S = x R^T``; backward ``G = dY Q``.
* ``project_and_reduce(a, basis, s)``: ``G = a @ basis`` and ``dlam = sum_t S * G`` in ONE pass over ``a``
  (dY): each program multiplies its G tile by the matching S tile in registers.
  - One adapter: each row-block program writes the column sums of its tile to a (num_row_blocks, r) buffer,
    which one torch ``sum`` reduces. No atomics, so the result is deterministic, and an autotuner re-run
    simply rewrites the same values.
  - Several adapters (per-token ``lam_index``): the kernel writes the per-token products ``S*G`` (T, r) and
    ``index_add_`` folds them per adapter. A block's tokens may belong to any adapter, so an in-kernel
    reduction would need atomics or a loop over adapters; the product buffer costs one (T, r) float32
    write and read, small beside the (T, N) pass over dY. On CUDA ``index_add_`` is deterministic only
    under ``torch.use_deterministic_algorithms(True)``.
Reference: ``reference.project`` and ``reference.project_and_reduce``.
"""
# No `from __future__ import annotations`: the kernels' tl.constexpr annotations stay real objects, which every
# Triton release (3.6 on the GPU image, 3.8 here) reads the same way.
import torch
import triton
import triton.language as tl

from . import interpreter_compat, utils
from .gemm_tile import grouped_tile, matmul_tile
from .lowrank_matmul import _TL_ACC, check_lam_index

REDUCE_NONE, REDUCE_BLOCKS, REDUCE_TOKENS = 0, 1, 2


# reset_to_zero: while autotuning, configs with a smaller BLOCK_M write more partial rows than the winner;
# zeroing before the winner's run keeps their leftovers out of the sum.
@interpreter_compat.autotune(configs=utils.project_configs(), key=["M_BUCKET", "R", "K", "REDUCE"],
                             reset_to_zero=["partial_ptr"],
                             prune_configs_by={"early_config_prune": utils.prune_by_size("M", "R")})
@triton.jit
def _project_kernel(
    a_ptr, basis_ptr, s_ptr, g_ptr, partial_ptr,
    M, R, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_br,
    stride_sm, stride_sr, stride_gm, stride_gr, stride_pm, stride_pr,
    REDUCE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_r = grouped_tile(tl.program_id(0), M, R, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = offs_r % R
    acc = matmul_tile(a_ptr, basis_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_br,
                      INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)

    in_rows = offs_m < M
    in_rank = offs_r < R
    mask = in_rows[:, None] & in_rank[None, :]
    rows_out = offs_m.to(tl.int64)
    tl.store(g_ptr + rows_out[:, None] * stride_gm + offs_r[None, :] * stride_gr,
             acc.to(g_ptr.dtype.element_ty), mask=mask)
    if REDUCE != 0:
        # Wrapped rows duplicate real ones: zeroed by a select, not by S = 0 (0 * inf would put a NaN in the sums
        # where a real row's G is infinite).
        s = tl.load(s_ptr + rows_out[:, None] * stride_sm + offs_r[None, :] * stride_sr, mask=mask, other=0.0)
        prod = tl.where(mask, s.to(ACC_DTYPE) * acc, 0.0)
        if REDUCE == 1:
            tl.store(partial_ptr + pid_m * stride_pm + offs_r * stride_pr, tl.sum(prod, axis=0), mask=in_rank)
        else:
            tl.store(partial_ptr + rows_out[:, None] * stride_pm + offs_r[None, :] * stride_pr, prod, mask=mask)


def _check_inputs(a, basis):
    utils.check_matmul_operands("a", a, "basis", basis)
    if basis.shape[1] < 1:
        raise ValueError("rank must be at least 1 (basis has no columns)")


def _launch(a, basis, s, g, partial, reduce, input_precision):
    M, K = a.shape
    R = basis.shape[1]
    if M == 0:
        return
    s_ = s if s is not None else g
    p_ = partial if partial is not None else g
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(R, meta["BLOCK_N"]),)  # noqa: E731
    _project_kernel[grid](
        a, basis, s_, g, p_, M, R, K, utils.token_bucket(M),
        a.stride(0), a.stride(1), basis.stride(0), basis.stride(1),
        s_.stride(0), s_.stride(1), g.stride(0), g.stride(1), p_.stride(0), p_.stride(1),
        REDUCE=reduce, INPUT_PRECISION=utils.dot_precision(a.dtype, input_precision),
        ACC_DTYPE=_TL_ACC[utils.accumulator_dtype(a.dtype)], **utils.COMPILE_OPTIONS,
    )


def project(a: torch.Tensor, basis: torch.Tensor, *, out: torch.Tensor | None = None,
            input_precision: str | None = None) -> torch.Tensor:
    """P = a @ basis, accumulated and returned in float32 (float64 for float64 inputs).

    ``a`` (M, K) and ``basis`` (K, r) of one dtype, any strides (``R.t()`` is fine). ``out``: an (M, r) buffer
    of the accumulator dtype. ``input_precision`` as in ``lowrank_matmul``.
    """
    _check_inputs(a, basis)
    device = utils.check_runnable(a, basis)
    out = utils.check_out(out, (a.shape[0], basis.shape[1]), utils.accumulator_dtype(a.dtype), device)
    with utils.nvtx_range("qrlora/project", device):
        _launch(a, basis, None, out, None, REDUCE_NONE, input_precision)
    return out


def project_and_reduce(a: torch.Tensor, basis: torch.Tensor, s: torch.Tensor, *,
                       lam_index: torch.Tensor | None = None, num_adapters: int = 1,
                       out: torch.Tensor | None = None, dlam_out: torch.Tensor | None = None,
                       input_precision: str | None = None):
    """G = a @ basis and dlam = sum over tokens of S * G, in one pass over ``a``. Returns ``(G, dlam)``.

    ``a`` (T, N) (dY), ``basis`` (N, r) (Q), ``s`` (T, r) (S = x R^T, any float dtype). G is float32 (float64
    for float64 inputs); dlam is (r,), or (num_adapters, r) when ``lam_index`` (T,) gives each token's
    adapter. ``out`` / ``dlam_out``: buffers for G / dlam.
    """
    _check_inputs(a, basis)
    utils.check_float("s", s, in_dot=False)  # multiplies G element-wise for dlam
    utils.check_2d("s", s)
    T, r = a.shape[0], basis.shape[1]
    if tuple(s.shape) != (T, r):
        raise ValueError(f"s has shape {tuple(s.shape)}, expected (tokens, rank) = ({T}, {r}) "
                         f"from a {tuple(a.shape)} and basis {tuple(basis.shape)}")
    if lam_index is not None:
        check_lam_index(lam_index, T)
        if num_adapters < 1:
            raise ValueError(f"num_adapters must be at least 1, got {num_adapters}")
    device = utils.check_runnable(a, basis, s, lam_index)
    acc = utils.accumulator_dtype(a.dtype)
    g = utils.check_out(out, (T, r), acc, device)
    dlam_shape = (r,) if lam_index is None else (num_adapters, r)
    dlam = utils.check_out(dlam_out, dlam_shape, acc, device)
    with utils.nvtx_range("qrlora/project_and_reduce", device):
        if T == 0:
            dlam.zero_()
        elif lam_index is None:
            # Sized for the smallest BLOCK_M any config may pick, and zeroed: rows that the chosen config
            # leaves untouched then add nothing.
            partial = torch.zeros((triton.cdiv(T, _min_block_m()), r), dtype=acc, device=device)
            _launch(a, basis, s, g, partial, REDUCE_BLOCKS, input_precision)
            torch.sum(partial, dim=0, out=dlam)
        else:
            prod = torch.empty((T, r), dtype=acc, device=device)
            _launch(a, basis, s, g, prod, REDUCE_TOKENS, input_precision)
            dlam.zero_().index_add_(0, lam_index, prod)
    return g, dlam


def _min_block_m() -> int:
    return min(c.kwargs["BLOCK_M"] for c in utils.project_configs())
