"""The merged strategy's kernels: ``W_eff = W0 + (Q * lam) R`` and dlam through the weight gradient.

``merged_weight`` is one grouped GEMM over r per (N, K) tile of W_eff with W0 added in the epilogue: it reads
W0 once and writes W_eff once, whatever the token count. ``lam`` scales Q's columns in float32; the scaled
tile is cast to Q's dtype so the dot runs on tensor cores.

``dlam_via_weight_grad`` computes ``dlam_i = sum_jk Q_ji (dY^T x)_jk R_ik``: the (N, K) weight gradient
``M = dY^T x`` in float32 (one GEMM, the same kernel as ``lowrank_matmul`` storing float32 even for half
inputs: rounding M to half loses too much to cancellation in the sum), then the rowwise dot of ``Q^T M`` and R
(torch). It is cheaper than the projection route only when r is large (see ``dispatch.dlam_costs``).
Reference: ``reference.merged_weight`` and ``reference.dlam_via_weight_grad``.
"""
# No `from __future__ import annotations`: the kernels' tl.constexpr annotations stay real objects, which every
# Triton release (3.6 on the GPU image, 3.8 here) reads the same way.
import torch
import triton
import triton.language as tl

from . import interpreter_compat, utils
from .gemm_tile import add_lowrank_tile, grouped_tile
from .lowrank_matmul import _TL_ACC, matmul


# restore_value: autotuning runs the kernel once per config, which would apply the update repeatedly when out is
# weight itself (an in-place merge); restoring out between runs keeps that safe.
@interpreter_compat.autotune(configs=utils.gemm_configs(), key=["N", "K", "R"], restore_value=["out_ptr"],
                             prune_configs_by={"early_config_prune": utils.prune_by_size("N", "K")})
@triton.jit
def _merged_weight_kernel(
    w_ptr, q_ptr, lam_ptr, r_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_qn, stride_qr, stride_lr, stride_rr, stride_rk, stride_on, stride_ok,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tiles of W_eff: BLOCK_M rows of N, BLOCK_N columns of K; BLOCK_K is the chunk of r per dot.
    pid_m, pid_n = grouped_tile(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % N).to(tl.int64)
    cols = (offs_n % K).to(tl.int64)

    # W_eff's update (Q * lam) @ R is the low-rank term of lowrank_matmul with Q in place of p and R of u.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = add_lowrank_tile(acc, q_ptr, lam_ptr, lam_ptr, r_ptr, rows, cols, R,
                           stride_qn, stride_qr, 0, stride_lr, stride_rr, stride_rk,
                           False, False, 1.0, 1.0, INPUT_PRECISION, ACC_DTYPE, BLOCK_K)

    mask = (offs_m[:, None] < N) & (offs_n[None, :] < K)
    out_rows = offs_m.to(tl.int64)
    w = tl.load(w_ptr + out_rows[:, None] * stride_wn + offs_n[None, :] * stride_wk, mask=mask, other=0.0)
    acc += w.to(ACC_DTYPE)
    tl.store(out_ptr + out_rows[:, None] * stride_on + offs_n[None, :] * stride_ok,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _single_lam(lam: torch.Tensor, r: int) -> torch.Tensor:
    utils.check_float("lam", lam, in_dot=False)  # scales a tile; never a dot operand itself
    if lam.dim() == 2 and lam.shape[0] == 1:
        lam = lam[0]
    if lam.dim() != 1 or lam.shape[0] != r:
        raise ValueError(f"lam has shape {tuple(lam.shape)}, expected ({r},) for rank {r} (the merged strategy "
                         "serves one adapter; multi-adapter batches take the lowrank strategy)")
    return lam


def merged_weight(weight: torch.Tensor, Q: torch.Tensor, lam: torch.Tensor, R: torch.Tensor, *,
                  out: torch.Tensor | None = None, input_precision: str | None = None) -> torch.Tensor:
    """W_eff = W0 + (Q * lam) @ R in ``weight``'s dtype (accumulated in float32).

    ``weight`` (N, K), ``Q`` (N, r), ``lam`` (r,) or (1, r), ``R`` (r, K); weight, Q and R share a dtype, any
    strides. ``out``: an (N, K) buffer of weight's dtype (it may be ``weight`` itself: each tile reads its W0
    block before writing it, so an in-place merge is safe).
    """
    for name, t in (("weight", weight), ("Q", Q), ("R", R)):
        utils.check_float(name, t)
        utils.check_2d(name, t)
    N, K = weight.shape
    utils.check_size("output size", "weight.shape[0]", N, "Q.shape[0]", Q.shape[0])
    utils.check_size("input size", "weight.shape[1]", K, "R.shape[1]", R.shape[1])
    utils.check_size("rank", "Q.shape[1]", Q.shape[1], "R.shape[0]", R.shape[0])
    r = Q.shape[1]
    if r < 1:
        raise ValueError("rank must be at least 1 (Q has no columns)")
    for name, t in (("Q", Q), ("R", R)):
        if t.dtype != weight.dtype:
            raise TypeError(f"mixed dtypes: weight is {weight.dtype} but {name} is {t.dtype}")
    lam = _single_lam(lam, r)
    device = utils.check_runnable(weight, Q, lam, R)
    out = utils.check_out(out, (N, K), weight.dtype, device)
    if N == 0 or K == 0:
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)  # noqa: E731
    with utils.nvtx_range("qrlora/merged_weight", device):
        _merged_weight_kernel[grid](
            weight, Q, lam, R, out, N, K, r,
            weight.stride(0), weight.stride(1), Q.stride(0), Q.stride(1), lam.stride(0),
            R.stride(0), R.stride(1), out.stride(0), out.stride(1),
            INPUT_PRECISION=utils.dot_precision(weight.dtype, input_precision),
            ACC_DTYPE=_TL_ACC[utils.accumulator_dtype(weight.dtype)], **utils.COMPILE_OPTIONS,
        )
    return out


def dlam_via_weight_grad(dy: torch.Tensor, x: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, *,
                         input_precision: str | None = None) -> torch.Tensor:
    """dlam = diag(Q^T (dY^T x) R^T), float32 (float64 for float64 inputs), shape (r,).

    ``dy`` (T, N), ``x`` (T, K), ``Q`` (N, r), ``R`` (r, K), one dtype, any strides.
    """
    for name, t in (("dy", dy), ("x", x), ("Q", Q), ("R", R)):
        utils.check_float(name, t)
        utils.check_2d(name, t)
    utils.check_size("token count", "dy.shape[0]", dy.shape[0], "x.shape[0]", x.shape[0])
    utils.check_size("output size", "dy.shape[1]", dy.shape[1], "Q.shape[0]", Q.shape[0])
    utils.check_size("input size", "x.shape[1]", x.shape[1], "R.shape[1]", R.shape[1])
    utils.check_size("rank", "Q.shape[1]", Q.shape[1], "R.shape[0]", R.shape[0])
    for name, t in (("x", x), ("Q", Q), ("R", R)):
        if t.dtype != dy.dtype:
            raise TypeError(f"mixed dtypes: dy is {dy.dtype} but {name} is {t.dtype}")
    device = utils.check_runnable(dy, x, Q, R)
    acc = utils.accumulator_dtype(dy.dtype)
    with utils.nvtx_range("qrlora/dlam_via_weight_grad", device):
        weight_grad = matmul(dy.t(), x, out_dtype=acc, input_precision=input_precision)
        # Q^T M is (r, K): an fp32 GEMM as large as the merge itself, which the cost model already counts.
        return ((Q.t().to(acc) @ weight_grad) * R.to(acc)).sum(dim=1)
