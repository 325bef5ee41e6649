"""qrcp: LAPACK's QRCP test ratios on xGEQP3RK's matrix types, scipy-compatible pivots, the
stopping rules against their definitions, the randomized mode's rank-revealing quality,
and the input checks."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from qrlora_kernels import qrcp
from qrlora_kernels.qr import MODES, QRCPRawResult, QRCPResult
from qrlora_kernels.testing import rel_error
from qr_checks import (THRESHOLD, check_structure, dependent_columns, lapack_ratios, matrix_types,
                       with_spectrum)

REPO = Path(__file__).resolve().parents[1]

SIZES = [0, 1, 2, 3, 5, 10, 50]
METHODS = ["geqp3", "randomized"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [1, 3, 20])
def test_lapack_ratios_all_sizes(device, method, dtype, block_size):
    for m in SIZES:
        for n in SIZES:
            A = torch.randn(m, n, dtype=dtype, device=device)
            res = qrcp(A, method=method, _block_size=block_size)
            assert res.Q.device == A.device
            check_structure(A, res, monotone=method == "geqp3")


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (70, 70)])
@pytest.mark.parametrize("block_size", [3, 20])
def test_sizes_crossing_panel_boundaries(device, shape, block_size):
    # 70 = 3 * 20 + 10 and 40 = 2 * 20: full, partial and exactly filled last panels.
    A = torch.randn(*shape, dtype=torch.float64, device=device)
    for method in METHODS:
        check_structure(A, qrcp(A, method=method, _block_size=block_size), monotone=method == "geqp3")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(36, 24), (24, 36)])
def test_lapack_matrix_types(device, method, dtype, shape):
    for name, A in matrix_types(*shape, dtype).items():
        A = A.to(device)
        try:
            check_structure(A, qrcp(A, method=method, _block_size=5), monotone=method == "geqp3")
        except AssertionError as exc:
            raise AssertionError(f"matrix type {name!r}: {exc}") from exc


@pytest.mark.parametrize("block_size", [1, 3, 20, None])
@pytest.mark.parametrize("shape", [(60, 45), (45, 60), (50, 50)])
def test_pivots_equal_scipy(device, shape, block_size):
    # Columns of clearly different norms: no near-ties for the pivot order.
    A = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, 2, shape[1], dtype=torch.float64)[torch.randperm(shape[1])]
    res = qrcp(A.to(device), _block_size=block_size)
    _, r_ref, p_ref = scipy.linalg.qr(A.numpy(), pivoting=True, mode="economic")
    np.testing.assert_array_equal(res.perm.cpu().numpy(), p_ref)
    np.testing.assert_allclose(res.R.cpu().diagonal().abs().numpy(), np.abs(np.diag(r_ref)), rtol=1e-10)
    # scipy's own check: an unpivoted QR of A[:, perm] reproduces |R|.
    r_again = np.linalg.qr(A.numpy()[:, p_ref], mode="r")
    np.testing.assert_allclose(np.abs(res.R.cpu().numpy()), np.abs(r_again), atol=1e-10 * np.abs(r_again).max())


@pytest.mark.parametrize("block_size", [1, 3, 20])
def test_norm_downdate_safeguard_matches_scipy(device, block_size):
    # Columns 12..23 are columns 0..11 plus 1e-9 noise: once their partners are factored,
    # 1 - (r/vn1)^2 is below float64's eps, the downdated norms are noise, and only the
    # recomputation (Drmac-Bujanovic) ranks them correctly against the 1e-11 columns.
    base = torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, 1, 12, dtype=torch.float64)
    near = base + 1e-9 * torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, 1.5, 12, dtype=torch.float64)
    A = torch.cat([base, near, torch.randn(40, 6, dtype=torch.float64) * 1e-11], dim=1)
    res = qrcp(A.to(device), _block_size=block_size)
    _, r_ref, p_ref = scipy.linalg.qr(A.numpy(), pivoting=True, mode="economic")
    np.testing.assert_array_equal(res.perm.cpu().numpy(), p_ref)
    np.testing.assert_allclose(res.R.cpu().diagonal().abs().numpy()[:24], np.abs(np.diag(r_ref))[:24], rtol=1e-4)
    check_structure(A.to(device), res)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [1, 7, 20, 21, 33])
def test_truncated_equals_leading_part_of_full(device, method, rank):
    A = torch.randn(48, 40, dtype=torch.float64, device=device)
    full = qrcp(A, method=method, _block_size=20, _seed=7)
    trunc = qrcp(A, rank=rank, method=method, _block_size=20, _seed=7)
    assert trunc.R.shape == (rank, 40) and trunc.Q.shape == (48, rank)
    assert torch.equal(trunc.perm[:rank], full.perm[:rank])
    torch.testing.assert_close(trunc.Q, full.Q[:, :rank], rtol=0, atol=1e-12)
    # The trailing columns may be ordered differently: compare them by original column index.
    by_column = lambda res: res.R[:rank][:, torch.argsort(res.perm)]  # noqa: E731
    torch.testing.assert_close(by_column(trunc), by_column(full), rtol=0, atol=1e-12)
    check_structure(A, trunc, monotone=method == "geqp3")


def residual_profile(A, method, seed):
    """Largest remaining column norm and remaining energy after k steps, k = 0..min(m, n),
    computed from the definitions on the full factorisation."""
    full = qrcp(A, method=method, _block_size=5, _seed=seed)
    R = full.R
    kmax = min(A.shape)
    maxnorm = [R[k:, k:].norm(dim=0).max().item() if k < kmax else 0.0 for k in range(kmax + 1)]
    energy = [R[k:, k:].square().sum().item() for k in range(kmax + 1)]
    return maxnorm, energy, A.square().sum().item(), full


@pytest.mark.parametrize("method", METHODS)
def test_stopping_rules_stop_where_defined(device, method):
    gen = torch.Generator().manual_seed(3)
    A = with_spectrum(40, 30, 0.5 ** torch.arange(30, dtype=torch.float64), generator=gen).to(device)
    maxnorm, energy, total, full = residual_profile(A, method, seed=11)
    amax = max(A.norm(dim=0).tolist())
    for target in (0, 3, 8, 17):
        # Thresholds halfway (geometrically) between the states target-1 and target: no ties.
        abstol = math.sqrt(maxnorm[target] * maxnorm[target - 1]) if target else 2 * maxnorm[0]
        res = qrcp(A, abstol=abstol, method=method, _block_size=5, _seed=11)
        assert res.R.shape[0] == target, f"abstol={abstol:.3e}: stopped at {res.R.shape[0]}, expected {target}"
        res = qrcp(A, reltol=abstol / amax, method=method, _block_size=5, _seed=11)
        assert res.R.shape[0] == target, f"reltol: stopped at {res.R.shape[0]}, expected {target}"
        if target:
            captured = [1 - e / total for e in energy]
            tau = 0.5 * (captured[target] + captured[target - 1])
            res = qrcp(A, tau=tau, method=method, _block_size=5, _seed=11)
            assert res.R.shape[0] == target, f"tau={tau}: stopped at {res.R.shape[0]}, expected {target}"
            # R's rows are Q^T A P, so their energy is exactly the energy captured.
            assert res.R.square().sum().item() / total >= tau - 1e-12
            check_structure(A, res, monotone=method == "geqp3")
    # rank caps the tolerance rules (LAPACK KMAX).
    assert qrcp(A, rank=4, abstol=0.0, method=method).R.shape[0] == 4
    # tau = 1 means all the energy: it stops at the exact (numerical) rank, here all 30 columns.
    assert qrcp(A, tau=1.0, method=method).R.shape[0] >= 29


@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix_has_rank_zero_under_tolerances(device, method):
    A = torch.zeros(12, 9, device=device)
    for kw in ({"abstol": 0.0}, {"reltol": 1e-3}, {"tau": 0.5}):
        res = qrcp(A, method=method, **kw)
        assert res.Q.shape == (12, 0) and res.R.shape == (0, 9), kw
    full = qrcp(A, method=method)
    assert full.R.shape == (9, 9) and not full.R.any()
    check_structure(A, full)


def test_exact_rank_deficiency_stops_at_rank(device):
    A = (torch.randn(30, 6, dtype=torch.float64) @ torch.randn(6, 25, dtype=torch.float64)).to(device)
    for method in METHODS:
        res = qrcp(A, reltol=1e-10, method=method)
        assert res.R.shape[0] == 6, method
        check_structure(A, res, monotone=method == "geqp3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_residuals_give_finite_orthonormal_factors(device, dtype):
    """Repeated columns and a subnormal column (dlarfg's tiny-beta case): the reflector's 1 / (alpha - beta)
    overflowed once alpha - beta was subnormal, giving a false "overflows" error or a NaN Q under a finite R."""
    for name, A in dependent_columns(dtype).items():
        for kw in ({}, {"reltol": 0.0}, {"rank": 4}):
            try:
                res = qrcp(A.to(device), **kw)
                assert bool(torch.isfinite(res.Q).all()), "Q is not finite"
                check_structure(A.to(device), res)
            except (AssertionError, ValueError) as exc:
                raise AssertionError(f"{name!r} {kw}: {exc}") from exc
        raw = qrcp(A.to(device), mode="raw")
        assert bool(torch.isfinite(raw.tau).all()) and bool(torch.isfinite(raw.q()).all()), name


def test_randomized_is_rank_revealing(device):
    gen = torch.Generator().manual_seed(5)
    n = 120
    sigma = 0.9 ** torch.arange(n, dtype=torch.float64)
    A = with_spectrum(150, n, sigma, generator=gen).to(device)
    res = qrcp(A, method="randomized", _block_size=16, _seed=1)
    det = qrcp(A)
    d = res.R.diagonal().abs().cpu()
    # |R_kk| tracks sigma_k (a strong RRQR guarantees a polynomial factor; geqp3 and HQRRP are
    # far better in practice), and the rank-k truncation is near the SVD optimum.
    ratio = d / sigma
    assert bool(((ratio > 0.1) & (ratio < 10)).all()), f"|R_kk| / sigma_k out of [0.1, 10]: {ratio.min()}, {ratio.max()}"
    AP = A[:, res.perm]
    for k in (10, 30, 60):
        trunc = torch.linalg.norm(AP - res.Q[:, :k] @ res.R[:k]).item()
        optimum = sigma[k:].square().sum().sqrt().item()
        det_trunc = torch.linalg.norm(A[:, det.perm] - det.Q[:, :k] @ det.R[:k]).item()
        assert trunc <= 3 * optimum, f"rank {k}: residual {trunc:.3e} vs SVD optimum {optimum:.3e}"
        assert trunc <= 2 * det_trunc, f"rank {k}: randomized {trunc:.3e} much worse than geqp3 {det_trunc:.3e}"


def test_randomized_is_reproducible_from_seed():
    A = torch.randn(40, 35)
    a = qrcp(A, method="randomized", _seed=3, _block_size=8)
    b = qrcp(A, method="randomized", _seed=3, _block_size=8)
    assert torch.equal(a.perm, b.perm) and torch.equal(a.R, b.R)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_factored_in_float32(device, dtype):
    A = torch.randn(33, 21, device=device).to(dtype)
    res = qrcp(A)
    assert res.Q.dtype == res.R.dtype == torch.float32
    check_structure(A.float(), res)


def test_edge_shapes(device):
    for m, n in [(0, 5), (5, 0), (0, 0)]:
        res = qrcp(torch.randn(m, n, device=device))
        assert res.Q.shape == (m, 0) and res.R.shape == (0, n) and res.perm.tolist() == list(range(n))
    res = qrcp(torch.tensor([[-3.0]], device=device))
    assert res.perm.tolist() == [0] and abs(res.R.item()) == 3.0 and abs(res.Q.item()) == 1.0


def test_input_is_not_modified_and_layouts_agree():
    A = torch.randn(30, 20, dtype=torch.float64)
    col_major = A.t().contiguous().t()
    before = col_major.clone()
    a, b = qrcp(A), qrcp(col_major)
    assert torch.equal(col_major, before), "qrcp wrote into its input"
    assert torch.equal(a.perm, b.perm)
    torch.testing.assert_close(a.R, b.R)
    strided = torch.randn(30, 40, dtype=torch.float64)[:, ::2]
    check_structure(strided, qrcp(strided))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kw", [{}, {"rank": 9}, {"tau": 0.7}, {"reltol": 0.2}])
def test_output_modes_agree_with_the_reduced_result(device, method, kw):
    """mode="raw" is the same factorisation in compact form, mode="r" the same R without Q."""
    A = torch.randn(37, 29, dtype=torch.float64, device=device)
    ref = qrcp(A, method=method, _block_size=5, _seed=4, **kw)
    k = ref.R.shape[0]
    raw = qrcp(A, method=method, mode="raw", _block_size=5, _seed=4, **kw)
    assert isinstance(raw, QRCPRawResult) and raw.rank == k
    assert raw.H.shape == (37, 29) and raw.tau.shape == (k,) and raw.H.device == A.device
    assert torch.equal(raw.perm, ref.perm)
    assert torch.equal(raw.r(), ref.R)
    torch.testing.assert_close(raw.q(), ref.Q, rtol=0, atol=1e-13)
    # The leading columns need only the leading reflectors.
    torch.testing.assert_close(raw.q(3), ref.Q[:, :3], rtol=0, atol=1e-13)
    assert raw.q(0).shape == (37, 0)
    # torch.ormqr applies Q^T from the compact form without forming Q: Q^T A P = R.
    QtAP = torch.ormqr(raw.H[:, :k], raw.tau, A[:, raw.perm], left=True, transpose=True)[:k]
    torch.testing.assert_close(QtAP, ref.R, rtol=0, atol=1e-12 * A.abs().max().item() * 37)
    r_only = qrcp(A, method=method, mode="r", _block_size=5, _seed=4, **kw)
    assert isinstance(r_only, QRCPResult) and r_only.Q.numel() == 0
    assert torch.equal(r_only.R, ref.R) and torch.equal(r_only.perm, ref.perm)


def test_output_modes_on_edge_shapes(device):
    for m, n in [(0, 5), (5, 0), (0, 0)]:
        raw = qrcp(torch.randn(m, n, device=device), mode="raw")
        assert raw.H.shape == (m, n) and raw.tau.shape == (0,) and raw.perm.tolist() == list(range(n))
        assert raw.q().shape == (m, 0) and raw.r().shape == (0, n)
    raw = qrcp(torch.tensor([[-3.0]], device=device), mode="raw")
    assert abs(raw.r().item()) == 3.0 and abs(raw.q().item()) == 1.0


def test_backward_raises():
    A = torch.randn(10, 8, requires_grad=True)
    Q, R, perm = qrcp(A)
    with pytest.raises(RuntimeError, match="qrcp is not differentiable"):
        (Q.sum() + R.sum()).backward()


@pytest.mark.parametrize("call, error, match", [
    (lambda: qrcp(torch.randn(3)), ValueError, "2-D matrix, got 1 dimensions"),
    (lambda: qrcp(torch.randn(2, 3, 4)), ValueError, "2-D matrix, got 3 dimensions"),
    (lambda: qrcp([[1.0, 2.0]]), TypeError, "must be a torch.Tensor"),
    (lambda: qrcp(torch.ones(3, 3, dtype=torch.int64)), TypeError, "floating point, got dtype torch.int64"),
    (lambda: qrcp(torch.ones(3, 3, dtype=torch.complex64)), TypeError, "complex"),
    (lambda: qrcp(torch.randn(4, 3), rank=-1), ValueError, r"rank must lie in \[0, min\(m, n\)\]"),
    (lambda: qrcp(torch.randn(4, 3), rank=4), ValueError, r"rank must lie in \[0, min\(m, n\)\] = \[0, 3\], got 4"),
    (lambda: qrcp(torch.randn(4, 3), rank=2.0), TypeError, "rank must be an int"),
    (lambda: qrcp(torch.randn(4, 3), tau=0.0), ValueError, r"tau .* must lie in \(0, 1\]"),
    (lambda: qrcp(torch.randn(4, 3), tau=1.5), ValueError, r"tau .* must lie in \(0, 1\]"),
    (lambda: qrcp(torch.randn(4, 3), tau=float("nan")), ValueError, "tau is NaN"),
    (lambda: qrcp(torch.randn(4, 3), tau=0.9, rank=2), ValueError, "conflicting stopping rules"),
    (lambda: qrcp(torch.randn(4, 3), tau=0.9, abstol=1e-3), ValueError, "conflicting stopping rules"),
    (lambda: qrcp(torch.randn(4, 3), abstol=-1.0), ValueError, "abstol must be >= 0"),
    (lambda: qrcp(torch.randn(4, 3), reltol=-0.5), ValueError, "reltol must be >= 0"),
    (lambda: qrcp(torch.randn(4, 3), method="svd"), ValueError, "unknown method 'svd'"),
    (lambda: qrcp(torch.randn(4, 3), mode="complete"), ValueError, "unknown mode 'complete'"),
    (lambda: qrcp(torch.randn(4, 3), mode="raw").q(4), ValueError, r"columns must be an int in \[0, 3\], got 4"),
    (lambda: qrcp(torch.randn(4, 3, device="meta")), ValueError, "qrcp: A is on the meta device; qrcp factors"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_scalars_are_numbers_like_any_other():
    """A rank from numpy (np.argmax of a cumulative energy, a config read with numpy) or a float32 tau stops where
    the Python number does; numpy's bool is no more a rank than Python's."""
    from qrlora_kernels import QRLoraConfig
    from qrlora_kernels.basis import build_basis
    A = torch.randn(30, 20, dtype=torch.float64)
    for numpy_args, python_args in (({"rank": np.int64(7)}, {"rank": 7}), ({"tau": np.float32(0.5)}, {"tau": 0.5}),
                                    ({"abstol": np.float64(1.0)}, {"abstol": 1.0})):
        got, expected = qrcp(A, **numpy_args), qrcp(A, **python_args)
        assert torch.equal(got.perm, expected.perm) and torch.equal(got.R, expected.R), numpy_args
    assert qrcp(A, mode="raw").q(np.int32(3)).shape == (30, 3)
    assert build_basis(A, rank=np.int64(5)).rank == 5
    config = QRLoraConfig(target_modules=["q"], rank=np.int64(4))
    assert type(config.rank) is int and QRLoraConfig.from_dict(config.to_dict()) == config  # JSON-able
    with pytest.raises(TypeError, match="rank must be an int"):
        qrcp(A, rank=np.bool_(True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_first_bad_column(bad):
    A = torch.randn(6, 5)
    A[4, 3] = bad
    A[1, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in column 3\)"):
        qrcp(A)


@pytest.mark.parametrize("mode", MODES)
def test_overflowing_norms_are_a_clear_error(mode):
    """Finite float32 entries whose column norms exceed float32's range: an error, not NaNs (float64 is fine)."""
    from qrlora_kernels import qrcp_batched

    A = torch.full((2, 2), 3e38)
    with pytest.raises(ValueError, match=r"qrcp: A overflows torch.float32 .* factor it in float64"):
        qrcp(A, mode=mode)
    with pytest.raises(ValueError, match=r"qrcp_batched: matrix 1 overflows torch.float32"):
        qrcp_batched(torch.stack([torch.randn(2, 2), A]), mode=mode)
    check_structure(A.double(), qrcp(A.double()))


def _normalised(shape, dtype):
    """A random matrix whose largest |entry| lies in [0.5, 1) (the scale qrcp factors a tiny matrix at)."""
    A = torch.randn(*shape, dtype=torch.float64)
    return (A / 2.0 ** math.frexp(float(A.abs().max()))[1]).to(dtype)


def _times(A, exponent):
    """A * 2**exponent (two steps in float64: 2**1060 is out of its range)."""
    half = exponent // 2
    return (A.double() * 2.0 ** half * 2.0 ** (exponent - half)).to(A.dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, exponent", [(torch.float32, -140), (torch.float32, -90), (torch.float64, -1060),
                                             (torch.float64, -700)])
def test_subnormal_scale_matrices_are_factored(mode, method, dtype, exponent):
    """Entries near or below the smallest normal number (float32 1.2e-38): the factorisation's reciprocals
    overflowed and qrcp said "A overflows torch.float32", which was false. Such a matrix is factored at a
    normal scale (times a power of two, exact): Q, the pivots and tau are those of the normal-scale matrix,
    and R is its R scaled back (to the rounding of the subnormal range)."""
    tiny = _times(_normalised((12, 9), dtype), exponent)  # float32 at 2**-140: subnormal, ~9 bits left
    A = _times(tiny, -exponent)  # exact: the same values at a normal scale
    assert torch.equal(_times(A, exponent), tiny)
    got, ref = qrcp(tiny, method=method, mode=mode, _seed=3), qrcp(A, method=method, mode=mode, _seed=3)
    grid = 2 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # two steps of the subnormal grid
    assert torch.equal(got[2], ref[2])
    if mode == "raw":
        assert torch.equal(got.tau, ref.tau) and torch.equal(got.q(), ref.q())
        assert torch.equal(torch.tril(got.H[:, :got.rank], -1), torch.tril(ref.H[:, :ref.rank], -1))
        torch.testing.assert_close(got.r().double(), ref.r().double() * 2.0 ** exponent, rtol=1e-15, atol=grid)
    else:
        assert torch.equal(got.Q, ref.Q) and got.R.dtype == dtype
        torch.testing.assert_close(got.R.double(), ref.R.double() * 2.0 ** exponent, rtol=1e-15, atol=grid)
    # The stopping rules: tau and reltol are scale-free, abstol scales with the matrix.
    for rule, scaled in ((dict(tau=0.8), dict(tau=0.8)), (dict(reltol=0.3), dict(reltol=0.3)),
                         (dict(abstol=0.5), dict(abstol=0.5 * 2.0 ** exponent))):
        assert torch.equal(qrcp(tiny, mode=mode, **scaled)[2], qrcp(A, mode=mode, **rule)[2]), rule
        assert qrcp(tiny, mode="raw", **scaled).rank == qrcp(A, mode="raw", **rule).rank, rule


@pytest.mark.parametrize("kw", [{}, dict(abstol=0.0), dict(abstol=1e-30, method="randomized", _seed=2**63 - 2),
                                dict(tau=0.9, mode="raw")])
def test_batched_subnormal_scale_matrices_equal_one_at_a_time(kw):
    """Each matrix of a batch at its own scale (a shared abstol then factors them one at a time, each with its
    seed in the batch)."""
    from qrlora_kernels import qrcp_batched

    A = torch.stack([_normalised((10, 7), torch.float32), _times(_normalised((10, 7), torch.float32), -140),
                     _times(_normalised((10, 7), torch.float32), -120), _normalised((10, 7), torch.float32) * 3])
    seed = kw.pop("_seed", 0)
    for b, got in enumerate(qrcp_batched(A, _seed=seed, **kw)):
        alone = qrcp(A[b], _seed=(seed + b + 2**63) % 2**64 - 2**63, **kw)
        assert all(torch.equal(x, y) for x, y in zip(got, alone)), f"matrix {b}"


def test_op_is_registered_with_its_schema():
    schema = str(torch.ops.qrlora.qrcp.default._schema)
    assert "qrcp(Tensor A, int rank, float tau, float abstol, float reltol, str method" in schema
    assert 'str mode="reduced"' in schema
    with pytest.raises(RuntimeError, match="unknown method 'x'"):
        torch.ops.qrlora.qrcp(torch.randn(3, 3), -1, -1.0, -1.0, -1.0, "x", 0, 0)
    with pytest.raises(RuntimeError, match="unknown mode 'full'"):
        torch.ops.qrlora.qrcp(torch.randn(3, 3), -1, -1.0, -1.0, -1.0, "geqp3", 0, 0, "full")


# ------------------------------------------------------------------------------- batched
def spectrum_batch(sizes, decays, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, n = sizes
    return torch.stack([with_spectrum(m, n, d ** torch.arange(min(m, n), dtype=dtype), generator=gen)
                        for d in decays])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kw", [{}, {"rank": 11}, {"tau": 0.9}, {"reltol": 1e-2}])
def test_batched_equals_one_matrix_at_a_time(device, threads, method, kw):
    from qrlora_kernels import qrcp_batched

    A = spectrum_batch((41, 33), [0.5, 0.7, 0.8, 0.9, 0.95], seed=2).to(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = qrcp_batched(A, method=method, _block_size=6, _seed=10, **kw)
    finally:
        torch.set_num_threads(before)
    assert len(batch) == A.shape[0]
    ranks = set()
    for b, res in enumerate(batch):
        ref = qrcp(A[b], method=method, _block_size=6, _seed=10 + b, **kw)
        assert isinstance(res, QRCPResult)
        assert torch.equal(res.perm, ref.perm), f"matrix {b}"
        assert res.R.shape == ref.R.shape, f"matrix {b} stopped at {res.R.shape[0]}, alone at {ref.R.shape[0]}"
        torch.testing.assert_close(res.R, ref.R, rtol=0, atol=1e-12)
        # Q's columns for a tiny |R_ii| are ill-determined (BLAS rounding differs with the thread
        # count); the well-determined ones must agree.
        d = res.R.diagonal().abs()
        good = int((d > 1e-6 * d[0]).sum()) if d.numel() else 0
        torch.testing.assert_close(res.Q[:, :good], ref.Q[:, :good], rtol=0, atol=1e-10)
        check_structure(A[b], res, monotone=method == "geqp3")
        ranks.add(res.R.shape[0])
    if "tau" in kw or "reltol" in kw:
        assert len(ranks) > 1, "the spectra differ, so each matrix must stop at its own rank"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# 384 x 320 is past the size at which the CPU panel splits its pass over the threads.
THREADED = (384, 320)


@pytest.mark.parametrize("shape, threads", [(THREADED, 2), ((129, 1500), 3), ((129, 1500), 5),
                                            ((1500, 129), 2), ((1500, 129), 3)])
@pytest.mark.parametrize("kw", [{}, {"rank": 40}, {"tau": 0.9}])
def test_factorisation_does_not_depend_on_the_thread_count(kw, shape, threads):
    """The CPU geqp3 results (pivots, R, the Householder vectors and Q) are bit-identical at 1 and more
    threads: neither the panel's split over threads nor the trailing GEMMs nor forming Q may change any
    sum (at 129 x 1500 a single threaded MKL GEMM of the update changed the last bits at 3+ threads;
    LAPACK's threaded orgqr changes Q's from 2 threads on; at 1500 x 129 forming Q's 32 x 1500 x 64
    products changed them at 2 and 3 threads on an AVX-512 Xeon even inside a parallel region, until
    each chunk set MKL to one thread). The randomized method is BLAS throughout, sketch and panels, so
    it is only equal to rounding."""
    A = torch.randn(*shape)
    one, two = (_with_threads(t, lambda: qrcp(A, mode="raw", **kw)) for t in (1, threads))
    assert torch.equal(one.perm, two.perm)
    assert one.rank == two.rank
    assert torch.equal(one.tau, two.tau)
    k = one.rank
    assert torch.equal(one.H[:, :k], two.H[:, :k]) and torch.equal(one.r(), two.r())
    q_one, q_two = (_with_threads(t, lambda: qrcp(A, **kw).Q) for t in (1, threads))
    assert torch.equal(q_one, q_two), "Q depends on the thread count"
    assert torch.equal(_with_threads(threads, lambda: one.q(k // 2)), q_one[:, :k // 2])


# ------------------------------------------------------------------------------- householder_q
def _householder_q(H, tau):
    from qrlora_kernels import _extension
    _extension.load()
    return torch.ops.qrlora.householder_q(H, tau)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (40, 40), (97, 33), (130, 64), (70, 65)])
def test_householder_q_matches_lapack_orgqr(device, dtype, shape):
    """Q from reflectors, blocked by 32 (shapes below, at and across block and 64-column chunk
    edges), against a float64 LAPACK orgqr of the same reflectors, with LAPACK's test ratios."""
    m, n = shape
    H, tau = torch.geqrf(torch.randn(m, n, dtype=torch.float64, device=device))
    ref = torch.linalg.householder_product(H, tau)
    Q = _householder_q(H.to(dtype), tau.to(dtype))
    assert Q.shape == (m, n) and Q.dtype == dtype and Q.device == H.device and Q.is_contiguous()
    eps = torch.finfo(dtype).eps
    assert rel_error(Q, ref) <= 30 * m * eps
    assert (Q.double().T @ Q.double() - torch.eye(n, dtype=torch.float64, device=device)).norm() / (m * eps) <= 30


def test_householder_q_edge_cases():
    empty = _householder_q(torch.randn(5, 0), torch.randn(0))
    assert empty.shape == (5, 0)
    assert _householder_q(torch.randn(0, 0), torch.randn(0)).shape == (0, 0)
    # A zero tau is an identity reflector; a column-major H (what geqrf returns) reads the same.
    H, tau = torch.geqrf(torch.randn(50, 40, dtype=torch.float64))
    tau[[0, 17, 39]] = 0
    ref = torch.linalg.householder_product(H, tau)
    assert rel_error(_householder_q(H, tau), ref) < 1e-13
    assert rel_error(_householder_q(H.contiguous(), tau), ref) < 1e-13
    assert torch.equal(_householder_q(H, tau), _householder_q(H.contiguous(), tau))


@pytest.mark.parametrize("method", METHODS)
def test_autocast_does_not_lower_the_precision(method):
    """Under a bf16 autocast region the products inside the ops must still run in float32 (the
    blocked Q formation's at::mm calls were autocast to bf16 and failed)."""
    A = torch.randn(130, 70)
    plain = qrcp(A, method=method, _seed=3)
    H, tau = torch.geqrf(A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = qrcp(A, method=method, _seed=3)
        q = _householder_q(H, tau)
    for x, y in zip(plain, inside):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert q.dtype == torch.float32 and torch.equal(q, _householder_q(H, tau))


@pytest.mark.parametrize("mode", MODES)
def test_inference_mode_with_threads(two_threads, mode):
    """Under torch.inference_mode the chunked products run on OpenMP workers, which must carry the caller's
    thread-local state (an in-place update of an inference tensor outside inference mode is an error):
    600 x 400 crosses both the trailing update's 256-row and forming Q's 64-column chunks."""
    from qrlora_kernels import qrcp_batched
    A = torch.randn(2, 600, 400)
    expected = [qrcp(A[b], mode=mode) for b in range(2)]
    with torch.inference_mode():
        got = qrcp(A[0], mode=mode)
        batch = qrcp_batched(A, mode=mode)
        q = got.q() if mode == "raw" else got.Q
    for x, y in zip(got, expected[0]):
        assert torch.equal(x, y)
    for b in range(2):
        assert all(torch.equal(x, y) for x, y in zip(batch[b], expected[b]))
    if mode != "r":
        assert q.shape == (600, 400) and torch.equal(q, expected[0].Q if mode == "reduced" else expected[0].q())


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_does_not_reach_the_factorisation(precision):
    """set_float32_matmul_precision("medium") lets oneDNN compute float32 matmuls in bfloat16 process-wide
    (Q's bits changed on this CPU): qrcp switches that off for its own products and gives the setting back.
    (On CUDA the op holds a thread-local NoTF32Guard instead.)"""
    A = torch.randn(300, 200)
    expected, raw = qrcp(A), qrcp(A, mode="raw")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        onednn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
        got, got_q = qrcp(A), raw.q()
        assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == onednn
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got.Q, expected.Q) and torch.equal(got.R, expected.R) and torch.equal(got_q, expected.Q)


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "fp32_precision"), reason="torch < 2.9 has no fp32_precision")
def test_precision_switch_gives_back_an_inherited_setting_as_inherited():
    """With the setting made on a parent (torch.backends.fp32_precision), the matmul setting only inherits it:
    after qrcp it must still follow the parent, not keep a copy of its old value."""
    from qrlora_kernels.qr import _full_float32
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "none"  # inherit (the legacy API sets explicit values)
        torch.backends.mkldnn.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"
        with _full_float32(torch.device("cpu")):
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
            with _full_float32(torch.device("cpu")):  # nested / concurrent calls: the outermost restores
                pass
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        torch.backends.fp32_precision = "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")


def test_raw_q_of_a_matrix_that_requires_grad():
    """A weight (a Parameter) factored in raw mode: H carries requires_grad, and .q() still forms Q."""
    A = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    raw, reduced = qrcp(A, mode="raw"), qrcp(A)
    q = raw.q()
    assert not q.requires_grad and torch.equal(q, reduced.Q.detach())


@pytest.mark.gpu
def test_a_cpu_only_build_factors_gpu_tensors_on_the_cpu_and_says_so(monkeypatch):
    """A CPU-only build (e.g. nvcc of another CUDA major than torch's) still answers for CUDA tensors, on the
    CPU, with a warning naming the cause, and the results come back on the GPU."""
    from qrlora_kernels import _extension
    _extension.load()
    monkeypatch.setattr(_extension, "build_info", lambda: {"kind": "cpu", "archs": []})
    A = torch.randn(40, 30, device="cuda")
    with pytest.warns(RuntimeWarning, match="built without its CUDA sources"):
        got = qrcp(A, rank=10)
    assert got.Q.device.type == "cuda" and got.R.device.type == "cuda"
    ref = qrcp(A.cpu(), rank=10)
    assert torch.equal(got.perm.cpu(), ref.perm) and torch.equal(got.R.cpu(), ref.R)


def test_raw_q_off_the_cpu_uses_torch():
    """.q() of a result that lives off the CPU (CUDA results of a CPU-only build, meta) forms Q with torch."""
    raw = qrcp(torch.randn(12, 7, dtype=torch.float64), mode="raw")
    meta = QRCPRawResult(raw.H.to("meta"), raw.tau.to("meta"), raw.perm.to("meta"))
    q = meta.q(5)
    assert q.device.type == "meta" and q.shape == (12, 5) and q.is_contiguous()


@pytest.mark.parametrize("H, tau, match", [
    (torch.randn(3, 5), torch.randn(5), "c <= m"),
    (torch.randn(6, 5), torch.randn(4), "tau of length c"),
    (torch.randn(6, 5), torch.randn(5, dtype=torch.float64), "share dtype"),
    (torch.randn(6, 5).half(), torch.randn(5).half(), "float32 or float64"),
    (torch.randn(2, 6, 5), torch.randn(5), "expected H"),
    (torch.randn(6, 5, requires_grad=True), torch.randn(5), "not differentiable"),
])
def test_householder_q_bad_inputs(H, tau, match):
    with pytest.raises(RuntimeError, match=match):
        _householder_q(H, tau)


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("shape", [(384, 320), (1500, 129), (1500, 64), (700, 200)])
def test_householder_q_does_not_depend_on_the_thread_count(shape, threads):
    """LAPACK's threaded orgqr rounds Q differently from 2 threads on; ours may not. The tall shapes'
    long sums (V^T C over 1,400+ rows) are where MKL's kernels follow its thread setting."""
    H, tau = torch.geqrf(torch.randn(*shape))
    one, more = (_with_threads(t, lambda: _householder_q(H, tau)) for t in (1, threads))
    assert torch.equal(one, more)


def test_thread_count_independence_survives_nested_openmp():
    """With nested OpenMP parallelism on (OMP_MAX_ACTIVE_LEVELS=2), where MKL may open its own threads inside
    the chunks' region, Q and the factorisation keep their bits (each chunk sets MKL to one thread). A
    subprocess, since OpenMP reads the variable once per process. No failure caused by nesting alone was
    found on the machines tried; this guards the property with nesting on, on a tall shape whose long
    sums follow MKL's thread setting."""
    script = textwrap.dedent("""
        import torch
        from qrlora_kernels import _extension, qrcp
        _extension.load()
        torch.manual_seed(0)
        A = torch.randn(1500, 129)
        H, tau = torch.geqrf(A)
        q = torch.ops.qrlora.householder_q
        def at(threads, fn):
            torch.set_num_threads(threads)
            return fn()
        one = at(1, lambda: (q(H, tau), *qrcp(A)))
        for threads in (2, 3):
            more = at(threads, lambda: (q(H, tau), *qrcp(A)))
            assert all(torch.equal(x, y) for x, y in zip(one, more)), threads
        print("same bits")
    """)
    env = {**os.environ, "OMP_MAX_ACTIVE_LEVELS": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "same bits" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [{}, {"rank": 40}, {"tau": 0.9}])
def test_batched_is_bit_identical_to_one_matrix_at_a_time_with_threads(two_threads, mode, kw):
    """With 2 threads a batch of 2 is factored one matrix per thread, a single matrix with both
    threads in its panel: the results must still be the same to the bit, or a model's bases would
    depend on how its weights happen to be grouped (and a distributed split on who factored what)."""
    from qrlora_kernels import qrcp_batched

    A = torch.randn(3, *THREADED)
    for batch in (A[:1], A[:2], A):
        results = qrcp_batched(batch, mode=mode, **kw)
        for b, got in enumerate(results):
            alone = qrcp(A[b], mode=mode, **kw)
            for x, y in zip(got, alone):
                assert x.shape == y.shape and torch.equal(x, y), f"matrix {b} of a batch of {len(batch)}"


def test_batched_modes_dtypes_and_edge_batches(device):
    from qrlora_kernels import qrcp_batched

    A = torch.randn(3, 20, 17, device=device)
    raw = qrcp_batched(A, mode="raw")
    assert all(isinstance(r, QRCPRawResult) and r.H.shape == (20, 17) for r in raw)
    for b, r in enumerate(raw):
        ref = qrcp(A[b])
        torch.testing.assert_close(r.q(), ref.Q, rtol=0, atol=1e-5)
        assert torch.equal(r.perm, ref.perm)
    half = qrcp_batched(A.to(torch.bfloat16), rank=4)
    assert all(r.Q.dtype == torch.float32 and r.R.shape == (4, 17) for r in half)
    assert qrcp_batched(torch.randn(0, 5, 4, device=device)) == []
    empty = qrcp_batched(torch.randn(2, 0, 4, device=device))
    assert [r.R.shape for r in empty] == [(0, 4), (0, 4)]


def test_batched_seeds_wrap_around_at_int64():
    """Matrix b's sketch is seeded with _seed + b modulo 2**64: the last int64 seed is followed by the first."""
    from qrlora_kernels import qrcp_batched

    A = torch.randn(2, 30, 24)
    batch = qrcp_batched(A, method="randomized", _block_size=8, _seed=2**63 - 1)
    for b, seed in enumerate((2**63 - 1, -2**63)):
        alone = qrcp(A[b], method="randomized", _block_size=8, _seed=seed)
        assert torch.equal(batch[b].perm, alone.perm) and torch.equal(batch[b].R, alone.R), f"matrix {b}"


@pytest.mark.parametrize("call, error, match", [
    (lambda f: f(torch.randn(4, 3)), ValueError, r"batch of matrices \(B x m x n\), got 2 dimensions"),
    (lambda f: f(torch.randn(2, 4, 3), rank=4), ValueError, r"rank must lie in \[0, min\(m, n\)\] = \[0, 3\]"),
    (lambda f: f(torch.randn(2, 4, 3), tau=0.5, rank=1), ValueError, "conflicting stopping rules"),
    (lambda f: f(torch.ones(2, 4, 3, dtype=torch.int32)), TypeError, "floating point"),
    (lambda f: f(torch.randn(2, 4, 3), mode="q"), ValueError, "unknown mode 'q'"),
    (lambda f: f(torch.randn(2, 4, 3), method="randomized", _seed=2**63), ValueError, "_seed must be an int64"),
    (lambda f: f(torch.randn(2, 4, 3, device="meta")), ValueError, "A is on the meta device"),
])
def test_batched_bad_inputs(call, error, match):
    from qrlora_kernels import qrcp_batched

    with pytest.raises(error, match=match):
        call(qrcp_batched)


def test_batched_names_the_matrix_and_column_with_nan():
    from qrlora_kernels import qrcp_batched

    A = torch.randn(4, 6, 5)
    A[2, 4, 3] = float("nan")
    A[2, 0, 4] = float("nan")
    A[3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"matrix 2 contains NaN or Inf \(first in column 3\)"):
        qrcp_batched(A)


# ------------------------------------------------------------------------------- properties
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 60), n=st.integers(1, 60), batch=st.integers(1, 4), block=st.integers(1, 24),
       method=st.sampled_from(METHODS), data=st.data())
def test_property_batched_raw_truncated_factorisations_are_valid(m, n, batch, block, method, data):
    """Any shape, block size and rank: each raw result of a batch is a valid (truncated) QRCP of its
    matrix by LAPACK's ratios, in float64, and its leading Q columns come from the leading reflectors."""
    from qrlora_kernels import qrcp_batched

    rank = data.draw(st.integers(0, min(m, n)), label="rank")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    A = torch.randn(batch, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    results = qrcp_batched(A, rank=rank, method=method, mode="raw", _block_size=block, _seed=seed)
    for b, raw in enumerate(results):
        assert raw.rank == rank and raw.H.shape == (m, n)
        res = QRCPResult(raw.q(), raw.r(), raw.perm)
        check_structure(A[b], res, monotone=method == "geqp3")
        fact, orth = lapack_ratios(A[b], res)
        assert fact < THRESHOLD and orth < THRESHOLD, (b, fact, orth)
        if rank:
            c = data.draw(st.integers(0, rank), label="columns")
            torch.testing.assert_close(raw.q(c), res.Q[:, :c], rtol=0, atol=1e-13)
