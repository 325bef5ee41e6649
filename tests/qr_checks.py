"""Checks of a pivoted QR shared by the qrcp tests: LAPACK's scaled test ratios and xGEQP3RK's test
matrix types (dchkqp3rk), plus matrices with a prescribed spectrum."""
import math

import torch

from qrlora_kernels.qr import QRCPResult

THRESHOLD = 30.0  # LAPACK's test threshold for the scaled ratios


def eps_of(dtype):
    return torch.finfo(dtype).eps


def one_norm(x):
    return x.abs().sum(0).max().item() if x.numel() else 0.0


def lapack_ratios(A, res, work_dtype=None):
    """(factorisation ratio, orthogonality ratio) in LAPACK's scaled 1-norm form, in float64.

    For a truncated result the factorisation check is ``||Q^T A P - R||`` (R's rows are exactly
    Q^T A P), for a full one ``||A P - Q R||``.
    """
    dtype = work_dtype or res.Q.dtype
    eps = eps_of(dtype)
    m, n = A.shape
    A64, Q, R, perm = A.double().cpu(), res.Q.double().cpu(), res.R.double().cpu(), res.perm.cpu()
    k = R.shape[0]
    # Scale to O(1) first so that near-overflow inputs do not overflow the check itself.
    scale = (A64.abs().max().item() if A64.numel() else 0.0) or 1.0
    AP = A64[:, perm] / scale
    anorm = one_norm(AP) or 1.0
    if k == min(m, n):
        fact = one_norm(AP - Q @ (R / scale))
    else:
        fact = one_norm(Q.T @ AP - R / scale)
    fact /= max(m, n, 1) * anorm * eps
    orth = one_norm(Q.T @ Q - torch.eye(k, dtype=torch.float64)) / (max(m, 1) * eps)
    return fact, orth


def check_structure(A, res, *, monotone=True, work_dtype=None):
    m, n = A.shape
    Q, R, perm = res
    k = R.shape[0]
    assert isinstance(res, QRCPResult)
    assert Q.shape == (m, k) and R.shape == (k, n) and perm.shape == (n,)
    assert perm.dtype == torch.int64 and Q.dtype == R.dtype == (work_dtype or A.dtype)
    assert sorted(perm.tolist()) == list(range(n)), "perm is not a permutation"
    assert torch.equal(R, R.triu()), "R is not upper trapezoidal"
    if monotone and k > 1:
        d = R.diagonal().abs().double()
        slack = 10 * eps_of(R.dtype) * d[0]  # rounding in equal norms
        assert bool((d[1:] <= d[:-1] * (1 + 1e-3) + slack).all()), f"|R_ii| increases: {d.tolist()}"
    fact, orth = lapack_ratios(A, res, work_dtype)
    assert fact < THRESHOLD, f"||AP - QR|| ratio {fact:.1f} (shape {m}x{n})"
    assert orth < THRESHOLD, f"||Q^T Q - I|| ratio {orth:.1f} (shape {m}x{n})"


def with_spectrum(m, n, sigma, dtype=torch.float64, generator=None):
    """m x n matrix with singular values ``sigma`` (length min(m, n)) and random singular vectors."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator))
    return ((U * torch.as_tensor(sigma, dtype=torch.float64)) @ V.T).to(dtype)


def matrix_types(m, n, dtype):
    """LAPACK xGEQP3RK's test matrix types (dchkqp3rk), by name."""
    eps = eps_of(dtype)
    k = min(m, n)
    rand = torch.randn(m, n, dtype=torch.float64)
    types = {"zero": torch.zeros(m, n, dtype=torch.float64)}
    diag = torch.zeros(m, n, dtype=torch.float64)
    diag[range(k), range(k)] = torch.randn(k, dtype=torch.float64)
    types["diagonal"] = diag
    types["upper triangular"] = rand.triu()
    types["lower triangular"] = rand.tril()
    for name, cols in {"zero column first": [0], "zero column last": [n - 1], "zero column middle": [n // 2],
                       "zero first half": list(range(n // 2)), "zero last half": list(range(n // 2, n)),
                       "zero odd columns": list(range(1, n, 2)), "zero even columns": list(range(0, n, 2))}.items():
        a = rand.clone()
        a[:, cols] = 0
        types[name] = a
    geometric = lambda cond: cond ** (-torch.arange(k, dtype=torch.float64) / max(k - 1, 1))  # noqa: E731
    types["cond 2"] = with_spectrum(m, n, geometric(2.0))
    types["cond sqrt(0.1/eps)"] = with_spectrum(m, n, geometric(math.sqrt(0.1 / eps)))
    types["cond 0.1/eps"] = with_spectrum(m, n, geometric(0.1 / eps))
    one_small = torch.ones(k, dtype=torch.float64)
    one_small[-1] = eps
    types["one small singular value"] = with_spectrum(m, n, one_small)
    # LAPACK dlatb4's near-underflow / near-overflow norms.
    small = 0.25 * torch.finfo(dtype).tiny / eps
    types["near underflow"] = rand * (small / rand.abs().max())
    types["near overflow"] = rand * ((1 / small) / rand.abs().max())
    return {name: a.to(dtype) for name, a in types.items()}


def dependent_columns(dtype):
    """Matrices whose residual becomes subnormal during the factorisation (no whole-matrix rescaling helps):
    exactly repeated columns (what is left after each step is exactly rank one and shrinks by about eps a step),
    and one column of subnormal entries beside normal ones. LAPACK's dlarfg rescales for these."""
    tiny = torch.finfo(dtype).tiny
    base = torch.randn(60, 5, dtype=torch.float64).to(dtype)
    subnormal = torch.randn(80, 6, dtype=torch.float64).to(dtype)
    subnormal[:, 2] = torch.randn(80, dtype=torch.float64).to(dtype) * (tiny / 1e3) / 4
    return {"ones": torch.ones(100, 50, dtype=dtype),
            "each column repeated 10 times": base.repeat_interleave(10, dim=1),
            "a subnormal column": subnormal}
