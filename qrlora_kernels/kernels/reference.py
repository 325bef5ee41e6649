"""Pure-torch reference for every Triton kernel in this folder.

Each function here has the same signature and semantics as its Triton twin,
so tests can run both on the same inputs and compare (in float64 where the
test wants a reference). Shapes, with T tokens, N = out_features, K = in_features:

* ``x``      (T, K)   activations (already flattened to 2-D)
* ``weight`` (N, K)   frozen W0, ``nn.Linear`` layout
* ``Q``      (N, r)   frozen basis columns
* ``R``      (r, K)   frozen basis rows, columns in W0's original order
* ``lam``    (r,) or (A, r)  coefficients; with A adapters, ``lam_index`` (T,) picks a row per token

The QR-LoRA layer is ``y = x W0^T + b + ((x R^T) * lam) Q^T``.
"""
from __future__ import annotations

import torch

from ..functional import acc_dtype


def _lam_rows(lam: torch.Tensor, lam_index: torch.Tensor | None, T: int) -> torch.Tensor:
    """Per-token coefficients, (T, r) or broadcastable (1, r)."""
    if lam.dim() == 1:
        return lam.unsqueeze(0)
    if lam_index is None:
        if lam.shape[0] != 1:
            raise ValueError(f"lam has {lam.shape[0]} adapters but no lam_index was given")
        return lam
    return lam.index_select(0, lam_index.long())


def project(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P = a @ basis, accumulated and returned in float32 (float64 for float64 inputs).

    Forward: S = x @ R^T (basis = R.T). Backward: G = dy @ Q (basis = Q).
    """
    acc = acc_dtype(a.dtype)
    return a.to(acc) @ basis.to(acc)


def project_and_reduce(a: torch.Tensor, basis: torch.Tensor, s: torch.Tensor, *,
                       lam_index: torch.Tensor | None = None, num_adapters: int = 1):
    """G = a @ basis and dlam = sum over tokens of S * G, in one pass over ``a``.

    Returns ``(G, dlam)``; dlam is (r,) for one adapter, (num_adapters, r) with ``lam_index``.
    """
    g = project(a, basis)
    prod = s.to(g.dtype) * g
    if lam_index is None:
        return g, prod.sum(0)
    dlam = torch.zeros(num_adapters, g.shape[1], dtype=g.dtype, device=g.device)
    dlam.index_add_(0, lam_index.long(), prod)
    return g, dlam


def lowrank_matmul(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
                   bias: torch.Tensor | None = None, *, lam_index: torch.Tensor | None = None) -> torch.Tensor:
    """out = a @ b + (p * lam) @ u + bias, in ``a``'s dtype (accumulated in float32/float64).

    Forward:  a = x,  b = W0^T (K, N), p = S (T, r), u = Q^T (r, N).
    Backward: a = dy, b = W0   (N, K), p = G (T, r), u = R   (r, K).
    """
    acc = acc_dtype(a.dtype)
    scaled = p.to(acc) * _lam_rows(lam, lam_index, a.shape[0]).to(acc)
    out = a.to(acc) @ b.to(acc) + scaled @ u.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(a.dtype)


def lowrank_update(c: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, u: torch.Tensor,
                   bias: torch.Tensor | None = None, *, lam_index: torch.Tensor | None = None) -> torch.Tensor:
    """out = c + (p * lam) @ u + bias, in ``c``'s dtype (accumulated in float32/float64).

    A Q-only layer (``store_r=False``): forward c = Y0, p = S = Y0 Q, u = Q^T, plus the bias; backward c = dY,
    p = G = dY Q, u = Q^T (giving dY0, then dx = dY0 W0).
    """
    acc = acc_dtype(c.dtype)
    scaled = p.to(acc) * _lam_rows(lam, lam_index, c.shape[0]).to(acc)
    out = c.to(acc) + scaled @ u.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(c.dtype)


def merged_weight(weight: torch.Tensor, Q: torch.Tensor, lam: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W_eff = W0 + (Q * lam) @ R, in ``weight``'s dtype (accumulated in float32/float64)."""
    acc = acc_dtype(weight.dtype)
    return (weight.to(acc) + (Q.to(acc) * lam.to(acc)) @ R.to(acc)).to(weight.dtype)


def dlam_via_weight_grad(dy: torch.Tensor, x: torch.Tensor, Q: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """dlam = diag(Q^T (dY^T x) R^T), i.e. dlam_i = sum_jk Q_ji (dY^T x)_jk R_ik (float32, float64 for float64)."""
    acc = acc_dtype(dy.dtype)
    weight_grad = dy.to(acc).t() @ x.to(acc)
    return ((Q.to(acc).t() @ weight_grad) * R.to(acc)).sum(dim=1)


def qrlora_linear(x, weight, bias, Q, R, lam, *, lam_index=None):
    """The whole layer on 2-D x: y = x W0^T + b + ((x R^T) * lam) Q^T."""
    s = project(x, R.t())
    return lowrank_matmul(x, weight.t(), s, lam, Q.t(), bias, lam_index=lam_index)
