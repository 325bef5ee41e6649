"""Tile-level pieces shared by the Triton kernels: the program -> tile order, the K-loop of a GEMM tile (pointer
loads, or TMA descriptors on sm_90) and the lam-scaled low-rank update. Triton inlines ``@triton.jit`` helpers
into their callers, so sharing them costs nothing at run time. Row and column indices come in already wrapped
(``offs % size``): the loads then need a mask only along the reduction dimension, and the callers mask their
stores.
"""
# No `from __future__ import annotations`: the tl.constexpr annotations stay real objects, which every
# Triton release (3.6 on the GPU image, 3.8 here) reads the same way.
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Tutorial 03's grouped ordering: GROUP_M row tiles share column tiles while they are hot in L2."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_ROWS)
    num_pid_n = tl.cdiv(num_cols, BLOCK_COLS)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def matmul_tile(a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
                INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile ``a[rows, :K] @ b[:K, cols]`` in an ACC_DTYPE accumulator."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def matmul_tile_tma(a_desc, b_desc, m0, n0, K, B_K_MAJOR: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``matmul_tile`` with its a/b tiles loaded through TMA descriptors (zero-padded past the edges, so no
    masks). ``a_desc`` is over a (M, K); ``b_desc`` over b (K, N), or over b^T (N, K) when B_K_MAJOR."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([m0, k * BLOCK_K])
        if B_K_MAJOR:
            b = b_desc.load([n0, k * BLOCK_K]).T
        else:
            b = b_desc.load([k * BLOCK_K, n0])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _p_lam_chunk(p_ptr, lam_ptr, adapter, rows, offs_r, in_rank, stride_pm, stride_pr, stride_la, stride_lr,
                 PER_TOKEN_LAM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One (rows, BLOCK_K) chunk of ``p * lam`` in ACC_DTYPE, zero past R (``adapter``: each row's lam row,
    read only with PER_TOKEN_LAM)."""
    p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr, mask=in_rank[None, :], other=0.0)
    if PER_TOKEN_LAM:
        lam = tl.load(lam_ptr + adapter[:, None] * stride_la + offs_r[None, :] * stride_lr,
                      mask=in_rank[None, :], other=0.0)
    else:
        lam = tl.load(lam_ptr + offs_r * stride_lr, mask=in_rank, other=0.0)[None, :]
    return p.to(ACC_DTYPE) * lam.to(ACC_DTYPE)


@triton.jit
def _half_range_scale(largest):
    """The power of two that brings ``largest`` (>= 0, float32) under 2^14, or 1 when it is under already.
    Built from the float32 exponent bits: exact, and so is its reciprocal (a normal float too)."""
    # largest lies in [2^e, 2^(e+1)) with e = biased exponent - 127; scaling by 2^-(e-13) puts it in [2^13, 2^14).
    biased = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shift = tl.maximum(biased - (127 + 13), 0)  # at most 255 - 140 = 115, so 2^-shift and 2^shift are normal
    return ((127 - shift) << 23).to(tl.float32, bitcast=True)


@triton.jit
def add_lowrank_tile(acc, p_ptr, lam_ptr, lam_index_ptr, u_ptr, rows, cols, R,
                     stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                     PER_TOKEN_LAM: tl.constexpr, GUARD_HALF_RANGE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + (p[rows, :R] * lam) @ u[:R, cols]``, R in chunks of BLOCK_K.

    ``lam`` is (R,), or with PER_TOKEN_LAM (A, R) indexed per row by ``lam_index``. It is applied in float32
    and the scaled tile is cast to u's dtype, so the dot runs on tensor cores like the main GEMM.

    GUARD_HALF_RANGE (for float16 u): ``p * lam`` can pass float16's 65504 while the output fits (each row is
    spread over the output's columns by the orthonormal Q), and the cast would make it inf. A first pass over
    the chunks takes the tile's largest finite ``|p lam|``; at or above 2^14 the tile is computed as
    ``((down * acc) + (down * p lam) @ u) / down`` with ``down`` an exact power of two, which changes no
    rounding except for elements over 2^27 times smaller than that largest (they reach float16's subnormals). Under
    2^14 (every tile of ordinary data) nothing changes, bit for bit; the cost is one more read of the p chunks.
    One scale per tile, not per row: per-row scales held 2 x BLOCK_M more values through the loop, and ptxas
    then spilled in 5 more sm_90 fp16 configs (benchmarks/NOTES.md section 8).
    """
    offs_k = tl.arange(0, BLOCK_K)
    if PER_TOKEN_LAM:
        adapter = tl.load(lam_index_ptr + rows).to(tl.int64)
    else:
        adapter = rows  # not read
    if GUARD_HALF_RANGE:
        tile_max = 0.0
        for j in range(0, tl.cdiv(R, BLOCK_K)):
            offs_r = j * BLOCK_K + offs_k
            chunk = _p_lam_chunk(p_ptr, lam_ptr, adapter, rows, offs_r, offs_r < R, stride_pm, stride_pr,
                                 stride_la, stride_lr, PER_TOKEN_LAM, ACC_DTYPE)
            # NaN and inf left out: a token that brings them spoils its own row only, as in nn.Linear, not its
            # tile's scale (2^-115 would flush every other row's update to zero).
            magnitude = tl.abs(chunk)
            magnitude = tl.where(magnitude < float("inf"), magnitude, 0.0)
            tile_max = tl.maximum(tile_max, tl.max(magnitude).to(tl.float32))
        down = _half_range_scale(tile_max)
        acc = acc * down
    for j in range(0, tl.cdiv(R, BLOCK_K)):
        offs_r = j * BLOCK_K + offs_k
        in_rank = offs_r < R
        scaled = _p_lam_chunk(p_ptr, lam_ptr, adapter, rows, offs_r, in_rank, stride_pm, stride_pr,
                              stride_la, stride_lr, PER_TOKEN_LAM, ACC_DTYPE)
        if GUARD_HALF_RANGE:
            scaled = scaled * down
        scaled = scaled.to(u_ptr.dtype.element_ty)
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=in_rank[:, None], other=0.0)
        acc = tl.dot(scaled, u, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if GUARD_HALF_RANGE:
        acc = acc * (1.0 / down)  # exact: down is a power of two
    return acc
