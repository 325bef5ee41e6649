"""Tile-level pieces shared by the Triton kernels: the program -> tile order, the K-loop of a GEMM tile (pointer
loads, or TMA descriptors on sm_90), the lam-scaled low-rank update and its float16 range guard. Triton inlines
``@triton.jit`` helpers into their callers, so sharing them costs nothing at run time. Row and column indices
come in already wrapped (``offs % size``): the loads then need a mask only along the reduction dimension, and
the callers mask their stores.
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
def _half_range_scales(largest):
    """Powers of two ``(down, up)``, ``down * up == 1``, with ``largest * down`` in [2^13, 2^14); (1, 1) when
    ``largest`` (0 <= largest < 2^24, float32) is under 2^14 already. Both are built from exponent bits (a GPU's
    float division need not be exact, even by a power of two)."""
    # largest lies in [2^e, 2^(e+1)) with e = biased exponent - 127; scaling by 2^-(e-13) puts it in [2^13, 2^14).
    biased = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shift = tl.maximum(biased - (127 + 13), 0)  # 0..10 for largest < 2^24
    down = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    up = ((127 + shift) << 23).to(tl.float32, bitcast=True)
    return down, up


@triton.jit
def half_range_scales(p_ptr, lam_ptr, lam_index_ptr, rows, R, stride_pm, stride_pr, stride_la, stride_lr,
                      PER_TOKEN_LAM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float16 range guard of one output tile: powers of two ``(down, up)`` for ``add_lowrank_tile``.

    ``p * lam`` (float32) is cast to float16 before its dot, and it can pass 65504 while the output fits (each
    row is spread over the output's columns by the orthonormal Q): the cast would make it inf. This takes the
    tile's largest ``|p lam|`` under 2^24 (an element-wise running maximum over the r-chunks, then one
    reduction); at 2^14 or more it returns the scales that bring it into [2^13, 2^14), else (1, 1), so ordinary
    tiles keep their bits. Scaling changes no rounding except for elements under 2^-14 / down <= 2^-4, which
    reach float16's subnormals: an absolute error of at most 2^-15 each, the size of float16's rounding of
    2^-4. Values of 2^24 or more, inf and NaN are left out of the maximum and overflow in their own rows only,
    as without the guard, instead of scaling the whole tile into float16's subnormals (in the forward such a
    row's update has an element of at least 2^24 / sqrt(N): past 65504 for N <= 2^16).

    Called before the tile's K-loop, while no accumulator is live; the cost is one more read of the tile's p
    chunks. One scale per tile, not per row: per-row scales kept 2 x BLOCK_M more values through the r-loop,
    and ptxas spilled in more sm_90 fp16 builds (measured with the scale taken after the K-loop; placing it
    before the K-loop spilled less again: benchmarks/NOTES.md section 8).
    """
    offs_k = tl.arange(0, BLOCK_K)
    if PER_TOKEN_LAM:
        adapter = tl.load(lam_index_ptr + rows).to(tl.int64)
    else:
        adapter = rows  # not read
    running = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
    for j in range(0, tl.cdiv(R, BLOCK_K)):
        offs_r = j * BLOCK_K + offs_k
        chunk = _p_lam_chunk(p_ptr, lam_ptr, adapter, rows, offs_r, offs_r < R, stride_pm, stride_pr,
                             stride_la, stride_lr, PER_TOKEN_LAM, ACC_DTYPE)
        magnitude = tl.abs(chunk).to(tl.float32)
        # Not counted: 2^24 or more, inf and NaN (false in the comparison).
        running = tl.maximum(running, tl.where(magnitude < 16777216.0, magnitude, 0.0))
    return _half_range_scales(tl.max(running))


@triton.jit
def add_lowrank_tile(acc, p_ptr, lam_ptr, lam_index_ptr, u_ptr, rows, cols, R,
                     stride_pm, stride_pr, stride_la, stride_lr, stride_ur, stride_un,
                     PER_TOKEN_LAM: tl.constexpr, GUARD_HALF_RANGE: tl.constexpr, down, up,
                     INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + (p[rows, :R] * lam) @ u[:R, cols]``, R in chunks of BLOCK_K.

    ``lam`` is (R,), or with PER_TOKEN_LAM (A, R) indexed per row by ``lam_index``. It is applied in float32
    and the scaled tile is cast to u's dtype, so the dot runs on tensor cores like the main GEMM.

    GUARD_HALF_RANGE (float16 u): the tile is computed as ``up * ((down * acc) + (down * p lam) @ u)`` with the
    exact powers of two ``(down, up)`` of ``half_range_scales`` (both 1 for ordinary tiles: the same bits as
    without the guard); otherwise ``down`` and ``up`` are not read.
    """
    offs_k = tl.arange(0, BLOCK_K)
    if PER_TOKEN_LAM:
        adapter = tl.load(lam_index_ptr + rows).to(tl.int64)
    else:
        adapter = rows  # not read
    if GUARD_HALF_RANGE:
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
        acc = acc * up
    return acc
