"""One GEMM with a low-rank correction fused into its accumulator: ``out = a @ b + (p * lam) @ u + bias``.

Forward:  ``a = x``,  ``b = W0^T`` (K, N), ``p = S = x R^T`` (T, r), ``u = Q^T`` (r, N), plus the bias.
Backward: ``a = dY``, ``b = W0``   (N, K), ``p = G = dY Q``   (T, r), ``u = R``   (r, K), no bias.

``lowrank_update`` is the same kernel with the GEMM replaced by a matrix it reads: ``out = c + (p * lam) @ u +
bias``. It is the whole update of a layer that keeps Q only (``store_r=False``), which works in the output
space: forward ``c = Y0 = x W0^T``, ``p = S = Y0 Q``, ``u = Q^T``, plus the bias; backward ``c = dY``, ``p = G``,
``u = Q^T`` (then ``dx = dY0 W0``): one pass over c, with the scaling, the cast and the bias fused.

The kernel is Triton tutorial 03's grouped GEMM: a K-loop over a/b tiles into one float32 accumulator, then an
r-loop that adds ``tl.dot((p*lam) tile, u tile)`` into the same accumulator, then the bias epilogue. The
correction therefore costs ``2*T*r*N`` flops and no extra pass over the output. ``lam`` is applied in float32
and the scaled tile is cast to the input dtype so the second dot also runs on tensor cores; in float16, a tile
of ``p * lam`` that would pass its range is first scaled by an exact power of two (from ``half_range_scales``,
applied in ``add_lowrank_tile``).

On sm_90 the autotuner also times tutorial 09's persistent TMA variant (``USE_TMA``/``PERSISTENT`` configs: one
program per SM loops over the tiles, and the K-loop's tiles arrive by TMA), offered only when the operands
suit TMA (``utils.tma_operands``); the low-rank update and the epilogue are the same code in both.
Reference: ``reference.lowrank_matmul``.
"""
# No `from __future__ import annotations`: the kernels' tl.constexpr annotations stay real objects, which every
# Triton release (3.6 on the GPU image, 3.8 here) reads the same way.
import torch
import triton
import triton.language as tl

from . import interpreter_compat, utils
from .gemm_tile import add_lowrank_tile, grouped_tile, half_range_scales, matmul_tile, matmul_tile_tma

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# The low-rank loop walks r in chunks of 16 (one MMA k-step), whatever the GEMM's BLOCK_K. With BLOCK_K-wide
# chunks the (p * lam) tiles and their pointers pushed most tiles past 255 registers per thread: built for sm_90
# (``python -m qrlora_kernels.kernels.aot_check --all``, Triton 3.8; 3.6 likewise at the first configs), 12 of
# 15 configs spilled in some fp16 variant, up to 2.5 KB of stack per thread, the largest (and TMA) tiles among
# them. With 16-wide chunks every config of the one-adapter variants builds spill-free; the per-token (several
# adapters) ones still spill up to 272 B in 3 configs. The loop's bytes per flop do not depend on the chunk.
# Chosen from the compiler's reports (benchmarks/NOTES.md section 7), not yet timed on a GPU.
_R_CHUNK = tl.constexpr(16)


@triton.jit
def _output_tile(tile, a_ptr, b_ptr, a_desc, b_desc, c_ptr, p_ptr, lam_ptr, lam_index_ptr, u_ptr, bias_ptr,
                 out_ptr, M, N, K, R,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                 stride_bias, stride_om, stride_on,
                 HAS_MATMUL: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PER_TOKEN_LAM: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, B_K_MAJOR: tl.constexpr,
                 USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Computes and stores output tile number ``tile``."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped (not masked) rows and columns keep the inner loads unmasked along M and N; the store masks them.
    # int64 so that row * stride cannot overflow for large token counts.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    # float16's range guard for the low-rank tile, taken before the K-loop (no accumulator live yet).
    guard_half_range: tl.constexpr = HAS_LOWRANK and u_ptr.dtype.element_ty == tl.float16
    down = 1.0
    up = 1.0
    if guard_half_range:
        down, up = half_range_scales(p_ptr, lam_ptr, lam_index_ptr, rows, R, stride_pm, stride_pr, stride_la,
                                     stride_lr, PER_TOKEN_LAM, ACC_DTYPE, _R_CHUNK)
    if not HAS_MATMUL:  # lowrank_update: the accumulator starts from c's tile
        acc = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn).to(ACC_DTYPE)
    elif USE_TMA:
        acc = matmul_tile_tma(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, B_K_MAJOR,
                              INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = matmul_tile(a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
                          INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_LOWRANK:
        acc = add_lowrank_tile(acc, p_ptr, lam_ptr, lam_index_ptr, u_ptr, rows, cols, R,
                               stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                               PER_TOKEN_LAM, guard_half_range, down, up, INPUT_PRECISION, ACC_DTYPE, _R_CHUNK)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias)
        acc += bias.to(ACC_DTYPE)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# HAS_MATMUL keys the cache too: a lowrank_update and a zero-width lowrank_matmul would otherwise share a key.
# restore_value: lowrank_update may write over c (out=c), and the autotuner runs every config on the same
# arguments (it copies c only while tuning; for lowrank_matmul c is a stand-in, never read).
@interpreter_compat.autotune(configs=utils.lowrank_gemm_configs(),
                             key=["M_BUCKET", "N", "K", "R", "TMA_OK", "B_K_MAJOR", "HAS_MATMUL"],
                             restore_value=["c_ptr"],
                             prune_configs_by={"early_config_prune": utils.prune_gemm("M", "N")})
@triton.jit(do_not_specialize=["TMA_OK", "NUM_SMS"])
def _lowrank_matmul_kernel(
    a_ptr, b_ptr, c_ptr, p_ptr, lam_ptr, lam_index_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, K, R, M_BUCKET, NUM_SMS, TMA_OK,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
    stride_bias, stride_om, stride_on,
    HAS_MATMUL: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TOKEN_LAM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, B_K_MAJOR: tl.constexpr,
    USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # TMA_OK only keys the autotuner (a TMA config is offered only for operands that suit it).
    if USE_TMA:
        # Built once per program; loads past the edges come back as zeros.
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    else:
        a_desc = a_ptr
        b_desc = b_ptr
    if PERSISTENT:
        # One program per SM walks the tiles (same grouped order), so no wave quantisation at the tail.
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
            _output_tile(tile, a_ptr, b_ptr, a_desc, b_desc, c_ptr, p_ptr, lam_ptr, lam_index_ptr, u_ptr, bias_ptr,
                         out_ptr, M, N, K, R, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                         stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                         stride_bias, stride_om, stride_on, HAS_MATMUL, HAS_LOWRANK, HAS_BIAS, PER_TOKEN_LAM,
                         INPUT_PRECISION, ACC_DTYPE, B_K_MAJOR, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _output_tile(tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, c_ptr, p_ptr, lam_ptr, lam_index_ptr, u_ptr,
                     bias_ptr, out_ptr, M, N, K, R, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                     stride_bias, stride_om, stride_on, HAS_MATMUL, HAS_LOWRANK, HAS_BIAS, PER_TOKEN_LAM,
                     INPUT_PRECISION, ACC_DTYPE, B_K_MAJOR, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _grid(M: int, N: int, num_sms: int):
    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, num_sms) if meta["PERSISTENT"] else tiles,)
    return grid


def _launch(a, b, p, lam, lam_index, u, bias, out, input_precision, c=None):
    """``a @ b`` (or, with ``c`` and no a, b: ``c``) ``+ (p * lam) @ u + bias`` into ``out``."""
    has_matmul = c is None
    M, N = out.shape
    K = a.shape[1] if has_matmul else 0
    if M == 0 or N == 0:
        return out
    has_lowrank = p is not None
    R = p.shape[1] if has_lowrank else 0
    # Unused pointer arguments still need a tensor; ``out`` stands in (never dereferenced).
    a_ = a if has_matmul else out
    b_ = b if has_matmul else out
    c_ = out if has_matmul else c
    p_ = p if has_lowrank else out
    u_ = u if has_lowrank else out
    lam_ = lam if has_lowrank else out
    lam_2d = lam_.dim() == 2
    index_ = lam_index if lam_index is not None else out
    bias_ = bias if bias is not None else out
    in_dtype = a.dtype if has_matmul else c.dtype
    tma_ok, b_k_major = utils.tma_operands(a, b) if has_matmul else (False, False)
    if tma_ok and out.is_cuda:
        utils.ensure_tma_allocator()
    num_sms = utils.num_programs(out.device)
    _lowrank_matmul_kernel[_grid(M, N, num_sms)](
        a_, b_, c_, p_, lam_, index_, u_, bias_, out,
        M, N, K, R, utils.token_bucket(M), num_sms, int(tma_ok),
        a_.stride(0), a_.stride(1), b_.stride(0), b_.stride(1), c_.stride(0), c_.stride(1),
        p_.stride(0), p_.stride(1) if p_.dim() == 2 else 0,
        lam_.stride(0) if lam_2d else 0, lam_.stride(-1),
        u_.stride(0), u_.stride(1) if u_.dim() == 2 else 0,
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        HAS_MATMUL=has_matmul, HAS_LOWRANK=has_lowrank, HAS_BIAS=bias is not None,
        PER_TOKEN_LAM=lam_index is not None, INPUT_PRECISION=utils.dot_precision(in_dtype, input_precision),
        ACC_DTYPE=_TL_ACC[utils.accumulator_dtype(in_dtype)], B_K_MAJOR=b_k_major, **utils.COMPILE_OPTIONS,
    )
    return out


def check_lam(lam: torch.Tensor, r: int, lam_index: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """lam as (r,) for one adapter or (A, r) with a (tokens,) integer lam_index; clear errors otherwise."""
    utils.check_float("lam", lam, in_dot=False)  # scales a tile; never a dot operand itself
    if lam.dim() not in (1, 2) or lam.shape[-1] != r:
        raise ValueError(f"lam has shape {tuple(lam.shape)}, expected ({r},) or (num_adapters, {r}) for rank {r}")
    if lam_index is None:
        if lam.dim() == 2:
            if lam.shape[0] != 1:
                raise ValueError(f"lam has {lam.shape[0]} adapters but no lam_index was given")
            lam = lam[0]
        return lam
    if lam.dim() != 2:
        raise ValueError(f"lam_index was given, so lam must be (num_adapters, {r}); got shape {tuple(lam.shape)}")
    check_lam_index(lam_index, tokens)
    return lam


def check_lam_index(lam_index: torch.Tensor, tokens: int) -> None:
    # The range of the ids is not checked here: that needs a device sync (functional.qrlora_linear checks it).
    if not isinstance(lam_index, torch.Tensor) or lam_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lam_index must be an int32 or int64 tensor, got "
                        f"{getattr(lam_index, 'dtype', type(lam_index).__name__)}")
    if lam_index.shape != (tokens,):
        raise ValueError(f"lam_index has shape {tuple(lam_index.shape)} but there are {tokens} tokens "
                         f"(expected ({tokens},))")
    if tokens > 1 and lam_index.stride(0) != 1:
        raise ValueError(f"lam_index must be contiguous (the kernels read it as a dense vector), got stride "
                         f"{lam_index.stride(0)}; pass lam_index.contiguous()")


def _check_correction(lead: str, first: torch.Tensor, cols_of: str, N: int, p, lam, lam_index, u, bias,
                      same_dtype: tuple) -> torch.Tensor:
    """The checks of ``(p * lam) @ u + bias`` against the (M, N) result, shared by ``lowrank_matmul`` (whose rows
    come from ``a`` and columns from ``b``) and ``lowrank_update`` (both from ``c``). Returns lam as ``check_lam``."""
    M, r = first.shape[0], p.shape[1]
    utils.check_size("token count", f"{lead}.shape[0]", M, "p.shape[0]", p.shape[0])
    utils.check_size("rank", "p.shape[1]", r, "u.shape[0]", u.shape[0])
    utils.check_size("output size", f"{cols_of}.shape[1]", N, "u.shape[1]", u.shape[1])
    if r < 1:
        raise ValueError("rank must be at least 1 (p has no columns)")
    for name, t in same_dtype + (("u", u),) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != first.dtype:
            raise TypeError(f"mixed dtypes: {lead} is {first.dtype} but {name} is {t.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},) from {cols_of}'s {N} columns")
    return check_lam(lam, r, lam_index, M)


def lowrank_matmul(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
                   bias: torch.Tensor | None = None, *, lam_index: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, input_precision: str | None = None) -> torch.Tensor:
    """out = a @ b + (p * lam) @ u + bias in one kernel, returned in ``a``'s dtype (accumulated in float32).

    ``a`` (M, K), ``b`` (K, N), ``p`` (M, r) (float32 is typical), ``lam`` (r,) or (A, r) with ``lam_index``
    (M,), ``u`` (r, N), ``bias`` (N,) or None. a, b, u and bias share a dtype; any strides. ``out``: an (M, N)
    buffer of a's dtype to write into. ``input_precision``: "ieee" or "tf32" for float32 (default: follows
    ``torch.backends.cuda.matmul.allow_tf32``; always "ieee" under the interpreter).
    """
    for name, t in (("a", a), ("b", b), ("p", p), ("u", u)):
        utils.check_float(name, t)
        utils.check_2d(name, t)
    M, K = a.shape
    utils.check_size("inner dimension", "a.shape[1]", K, "b.shape[0]", b.shape[0])
    N = b.shape[1]
    lam = _check_correction("a", a, "b", N, p, lam, lam_index, u, bias, (("b", b),))
    device = utils.check_runnable(a, b, p, lam, u, bias, lam_index)
    out = utils.check_out(out, (M, N), a.dtype, device)
    with utils.nvtx_range("qrlora/lowrank_matmul", device):
        return _launch(a, b, p, lam, lam_index, u, bias, out, input_precision)


def lowrank_update(c: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
                   bias: torch.Tensor | None = None, *, lam_index: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, input_precision: str | None = None) -> torch.Tensor:
    """out = c + (p * lam) @ u + bias in one pass over ``c``, in c's dtype (accumulated in float32).

    ``c`` (M, N), ``p`` (M, r) (float32 is typical), ``lam`` (r,) or (A, r) with ``lam_index`` (M,), ``u`` (r, N),
    ``bias`` (N,) or None; c, u and bias share a dtype; any strides. ``out``: an (M, N) buffer of c's dtype, or
    ``c`` itself (updated in place: each tile reads and writes only its own elements); any other memory shared
    with the inputs is refused. ``input_precision`` as in ``lowrank_matmul``.
    """
    for name, t in (("c", c), ("p", p), ("u", u)):
        utils.check_float(name, t)
        utils.check_2d(name, t)
    M, N = c.shape
    lam = _check_correction("c", c, "c", N, p, lam, lam_index, u, bias, ())
    device = utils.check_runnable(c, p, lam, u, bias, lam_index)
    out = utils.check_out(out, (M, N), c.dtype, device)
    if out.numel():
        in_place = (out.data_ptr() == c.data_ptr() and out.stride() == c.stride())
        shared = [name for name, t in (("c", c), ("p", p), ("u", u), ("bias", bias))
                  if t is not None and t.numel() and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                  and not (name == "c" and in_place)]
        if shared:
            raise ValueError(f"out must not share memory with {', '.join(shared)} (other than being c itself): tiles "
                             f"read the inputs while others write out")
    with utils.nvtx_range("qrlora/lowrank_update", device):
        return _launch(None, None, p, lam, lam_index, u, bias, out, input_precision, c=c)


def matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           input_precision: str | None = None) -> torch.Tensor:
    """Plain ``a @ b`` with the same kernel, but the result may be stored wider than the inputs
    (e.g. float32 for float16 inputs), which torch's matmul cannot do on every version."""
    utils.check_matmul_operands("a", a, "b", b)
    device = utils.check_runnable(a, b)
    out = utils.check_out(out, (a.shape[0], b.shape[1]), out_dtype or a.dtype, device)
    return _launch(a, b, None, None, None, None, None, out, input_precision)
