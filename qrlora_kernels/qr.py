"""``qrcp``: column-pivoted Householder QR of a matrix, from the ``qrlora::qrcp`` op in ``csrc/``.

Convention (scipy's): ``A[:, perm] ~= Q @ R`` with ``Q`` m x k (orthonormal columns), ``R`` k x n
upper trapezoidal, ``perm`` int64 of length n, and k the number of columns factored.

Stopping rules (LAPACK xGEQP3RK meaning for the first three):

* none: the full factorisation, k = min(m, n).
* ``rank=k``: exactly k columns (a cap when combined with ``abstol``/``reltol``).
* ``abstol``: stop at the first k whose largest remaining column norm ``max_j ||R22[:, j]||`` is
  ``<= abstol``.
* ``reltol``: the same test against ``reltol * max_j ||A[:, j]||``.
* ``tau``: stop at the first k whose captured energy ``1 - ||R22||_F^2 / ||A||_F^2 >= tau``.

``rank``, ``abstol`` and ``reltol`` combine as in LAPACK (stop at the first rule met); ``tau`` is an
energy rule that conflicts with the others and must be used alone. The tolerance rules stop
at an exactly zero residual, so a zero matrix has k = 0 under them.

``method="geqp3"`` (default) is deterministic and follows LAPACK dgeqp3: the pivots equal
``scipy.linalg.qr(A, pivoting=True)`` up to rounding on matrices without near-ties, and
``|R_ii|`` is non-increasing. ``method="randomized"`` picks blocks of pivots from a Gaussian
sketch (HQRRP): about the speed of unpivoted QR, rank-revealing in practice, but ``|R_ii|``
is only approximately non-increasing and the pivots differ from geqp3's.

float32/float64 inputs are factored in their own precision; float16/bfloat16 are factored in
float32 and the results are float32. Results live on the input's device. ``qrcp`` is not
differentiable.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from . import _extension

METHODS = ("geqp3", "randomized")


class QRCPResult(NamedTuple):
    Q: torch.Tensor
    R: torch.Tensor
    perm: torch.Tensor


class _NotDifferentiable(torch.autograd.Function):
    """Lets a QRCP sit in a graph but refuses to differentiate through it."""

    @staticmethod
    def forward(ctx, A, args):
        Q, R, perm = torch.ops.qrlora.qrcp(A.detach(), *args)
        ctx.mark_non_differentiable(perm)
        return Q, R, perm

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("qrcp is not differentiable: the pivoted QR is a discrete, non-smooth choice of basis; "
                           "detach its input (QR-LoRA keeps the factors frozen).")


def _check_number(name, value, *, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"qrcp: {name} must be {'an int' if integer else 'a real number'}, got {type(value).__name__}")
    if not integer and math.isnan(value):
        raise ValueError(f"qrcp: {name} is NaN")


def _validate(A, rank, tau, abstol, reltol, method):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"qrcp: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(f"qrcp: A must be a 2-D matrix, got {A.dim()} dimensions (shape {tuple(A.shape)})")
    if A.is_complex():
        raise TypeError(f"qrcp: complex matrices are not supported (dtype {A.dtype})")
    if not A.is_floating_point():
        raise TypeError(f"qrcp: A must be floating point, got dtype {A.dtype}")
    if method not in METHODS:
        raise ValueError(f"qrcp: unknown method {method!r}; expected one of {METHODS}")
    m, n = A.shape
    if rank is not None:
        _check_number("rank", rank, integer=True)
        if not 0 <= rank <= min(m, n):
            raise ValueError(f"qrcp: rank must lie in [0, min(m, n)] = [0, {min(m, n)}], got {rank}")
    if tau is not None:
        _check_number("tau", tau)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"qrcp: tau (energy fraction) must lie in (0, 1], got {tau}")
        if rank is not None or abstol is not None or reltol is not None:
            raise ValueError("qrcp: conflicting stopping rules: tau (energy) cannot be combined with "
                             "rank, abstol or reltol")
    for name, value in (("abstol", abstol), ("reltol", reltol)):
        if value is not None:
            _check_number(name, value)
            if value < 0:
                raise ValueError(f"qrcp: {name} must be >= 0, got {value}")
    if A.numel():
        finite = torch.isfinite(A)
        if not bool(finite.all()):
            col = int((~finite).any(dim=0).nonzero()[0, 0])
            raise ValueError(f"qrcp: A contains NaN or Inf (first in column {col})")


def qrcp(A: torch.Tensor, *, rank: int | None = None, tau: float | None = None, abstol: float | None = None,
         reltol: float | None = None, method: str = "geqp3", _block_size: int | None = None,
         _seed: int | None = None) -> QRCPResult:
    """Column-pivoted QR ``A[:, perm] ~= Q @ R``; see the module docstring for the rules.

    ``_block_size`` (panel width) and ``_seed`` (randomized sketch; drawn from torch's global
    generator when omitted) are for tests and benchmarks.
    """
    _validate(A, rank, tau, abstol, reltol, method)
    _extension.load()
    work = A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32)
    device = work.device
    if work.is_cuda and _extension.build_info()["kind"] != "cuda":
        work = work.cpu()  # a CPU-only build still answers, on the CPU
    if _seed is None:
        _seed = int(torch.randint(0, 2**62, ())) if method == "randomized" else 0
    args = (-1 if rank is None else int(rank), -1.0 if tau is None else float(tau),
            -1.0 if abstol is None else float(abstol), -1.0 if reltol is None else float(reltol),
            method, int(_block_size or 0), int(_seed))
    # One NVTX range per factorisation ("qrcp/geqp3" or "qrcp/randomized") for Nsight; no-op on the CPU.
    scope = torch.cuda.nvtx.range(f"qrcp/{method}") if work.is_cuda else contextlib.nullcontext()
    with scope:
        if work.requires_grad and torch.is_grad_enabled():
            Q, R, perm = _NotDifferentiable.apply(work, args)
        else:
            Q, R, perm = torch.ops.qrlora.qrcp(work, *args)
    return QRCPResult(Q.to(device), R.to(device), perm.to(device))
