"""Building a QR-LoRA basis (Q_r, R_r, pivots) from a frozen weight, and the rank rules.

For a weight W (out x in) the column-pivoted QR ``W[:, perm] = Q R`` gives the basis

* ``Q_r = Q[:, :r]``                      (out x r, orthonormal columns)
* ``R_r = R[:r, argsort(perm)]``          (r x in, W's original column order)

so that ``W ~= Q_r R_r`` and the adapter update is ``dW = Q_r diag(lam) R_r``.

Sign convention: Householder QR fixes each (Q column, R row) pair only up to a sign. We flip signs so that
``diag(R_r[:, perm[:r]]) > 0``. The basis is then a deterministic function of W and the pivots ``perm[:r]``
(uniqueness of the QR factorisation with a positive diagonal), which is what lets ``basis_from_pivots``
rebuild it from an adapter file that stores only the pivots.

Rank rules (exactly one of ``tau`` / ``rank``):

* ``energy="diag"`` (the paper): full factorisation, r = the smallest rank with
  ``sum_{i<=r} R_ii^2 >= tau * sum_i R_ii^2``.
* ``energy="frobenius"``: the factorisation stops early, at ``1 - ||R22||_F^2 / ||W||_F^2 >= tau``
  (the energy of W captured by the first r rows of R).
* ``rank=k``: a factorisation truncated at k.

Pivoting (``method``):

* ``"geqp3"`` (default, the paper's): LAPACK's deterministic column pivoting; on the CPU bit-identical at any
  thread count and however the weights are grouped.
* ``"randomized"``: pivot blocks chosen from a Gaussian sketch (HQRRP), about the speed of an unpivoted QR.
  The pivots differ from geqp3's and ``|R_ii|`` only approximately decreases, but the basis captures about
  the same energy at a given rank. The sketch is seeded with ``RANDOMIZED_SEED`` for every weight, so a
  model's bases are reproducible and do not depend on which weights are factorised together (or on which
  rank, in a process group); the BLAS may round differently with another thread count. Not usable with a
  global budget, whose selection relies on each module's energies decreasing.

Factorisations run in float32 (float64 for float64 weights); Q_r and R_r are returned in the weight's dtype.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch

ENERGY_RULES = ("diag", "frobenius")
QR_METHODS = ("geqp3", "randomized")
# The sketch seed of every randomized factorisation (see the module docstring).
RANDOMIZED_SEED = 0


class QRLoraBasis(NamedTuple):
    """A QR-LoRA basis of one weight.

    ``diag_energy`` holds the per-component energies ``R_ii^2``, normalised:

    * ``energy="diag"`` with ``tau``: by ``sum_j R_jj^2`` over the whole diagonal; length ``min(out, in)``,
      sums to 1 (the paper's quantity, comparable across modules for a global budget);
    * ``energy="frobenius"`` or ``rank``: the factorisation stopped at r, so the full diagonal is unknown;
      normalised by ``||W||_F^2`` (an upper bound of ``sum_j R_jj^2``), length r.

    ``energy_captured`` is ``sum(diag_energy[:rank])`` for the diag rule and ``||R_r||_F^2 / ||W||_F^2`` otherwise.
    """
    Q: torch.Tensor
    R: torch.Tensor
    perm: torch.Tensor
    rank: int
    energy_captured: float
    diag_energy: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.Q.dtype


class DeferredBasis(NamedTuple):
    """A diag-rule factorisation reduced to what a global budget needs before the ranks are known.

    Only the pivots and the normalised diagonal energies are kept (O(in) memory, not a full Q and R
    per module); ``truncate(deferred, r)`` then forms Q_r and R_r from the pivots with
    ``basis_from_pivots`` (an unpivoted QR of ``weight[:, perm[:r]]``), so no full Q is ever formed.
    """
    weight: torch.Tensor
    perm: torch.Tensor
    rank: int
    energy_captured: float
    diag_energy: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype} (QR-LoRA factorises the "
                        f"weight itself: a quantised layer, such as bitsandbytes' Linear4bit, needs its base model "
                        f"loaded unquantised, e.g. in bfloat16)")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}); there is no basis to build")
    if weight.is_meta:
        raise ValueError("weight is on the meta device: it has no values to factorise (load the model's weights "
                         "first)")


def _check_method(method) -> None:
    if method not in QR_METHODS:
        raise ValueError(f"method must be one of {QR_METHODS}, got {method!r}")


def _check_rule(tau, rank, energy, max_rank: int) -> None:
    if (tau is None) == (rank is None):
        raise TypeError("give exactly one of tau= (energy fraction) or rank= (number of components); "
                        f"got tau={tau!r}, rank={rank!r}")
    if energy not in ENERGY_RULES:
        raise ValueError(f"energy must be one of {ENERGY_RULES}, got {energy!r}")
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise TypeError(f"tau must be a float in (0, 1], got {type(tau).__name__}")
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be in [1, min(out_features, in_features)] = [1, {max_rank}], got {rank}")


def _normalise_signs(Q_r: torch.Tensor, R_r_pivoted: torch.Tensor):
    """Flip (Q column, R row) pairs so that the diagonal of the pivoted R block is positive."""
    r = Q_r.shape[1]
    signs = torch.sign(torch.diagonal(R_r_pivoted[:, :r]))
    # A zero diagonal entry means a rank-deficient block; any sign is valid there, pick +1 for determinism.
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q_r * signs, R_r_pivoted * signs.unsqueeze(1)


def _stopping_rule(tau, rank, energy, defer=False, method="geqp3") -> dict:
    """qrcp's keyword arguments for a rank rule and pivoting method. The diag rule needs the full
    factorisation but only r columns of Q, so it asks for the compact form and forms Q_r from the first r
    reflectors alone; a deferred basis needs no Q at all."""
    kwargs = {} if method == "geqp3" else {"method": method, "_seed": RANDOMIZED_SEED}
    if rank is not None:
        return dict(kwargs, rank=rank)
    if energy == "diag":
        return dict(kwargs, mode="r" if defer else "raw")
    return dict(kwargs, tau=tau)


def _basis_from_factorisation(weight: torch.Tensor, weight_energy: _Energy, result, tau, rank,
                              energy, defer=False) -> QRLoraBasis | DeferredBasis:
    """Choose r, form Q_r and R_r with the sign convention, from ``qrcp(w, **_stopping_rule(...))``."""
    if rank is None and energy == "diag":
        R, perm = result.R if defer else result.r(), result.perm
        # In R's dtype, as ever (the ranks decide the shapes of lam in saved checkpoints), after an exact power-of-two
        # scaling where the squares would overflow or vanish (see _energy_scale).
        diagonal = torch.diagonal(R)
        d = _scaled(diagonal, _energy_scale(float(diagonal.abs().max())), diagonal.dtype).square()
        cumulative = torch.cumsum(d, 0)
        # Smallest r with cumsum[r-1] >= tau * total; clamped because rounding can leave cumsum[-1] a hair below.
        r = min(int((cumulative < tau * cumulative[-1]).sum().item()) + 1, d.numel())
        diag_energy = d / cumulative[-1]
        energy_captured = float(diag_energy[:r].sum())
        if defer:
            return DeferredBasis(weight, perm.to(device=weight.device, dtype=torch.int64), r, energy_captured,
                                 diag_energy)
        Q_r = result.q(r)
    else:
        Q, R, perm = result
        r = Q.shape[1]
        Q_r = Q
        R_rows = R[:r]
        scale = weight_energy.scale
        diag_energy = _scaled(torch.diagonal(R_rows[:, :r]), scale, R.dtype).square() / weight_energy.energy
        energy_captured = float(torch.linalg.vector_norm(_scaled(R_rows, scale, R.dtype)).square()
                                / weight_energy.energy)

    Q_r, R_r_pivoted = _normalise_signs(Q_r, R[:r])
    perm = perm.to(device=weight.device, dtype=torch.int64)
    R_r = R_r_pivoted[:, torch.argsort(perm)]
    return QRLoraBasis(Q_r.to(weight.dtype), R_r.to(weight.dtype), perm, r, energy_captured, diag_energy)


class _Energy(NamedTuple):
    """``||W||_F^2 = energy * scale**2``: energy a 0-dim tensor in the compute dtype (None where the rank rule
    does not use it), scale from ``_energy_scale``."""
    scale: float
    energy: torch.Tensor | None


# Sums of squares are taken in the compute dtype, as they always were, but of values divided by a power of two
# (an exact division) when the largest |entry| lies outside this range: float32 squares overflow from |W| ~ 1e18
# and vanish below ~1e-23, which gave rank 1 and energy NaN, or called a weight all zeros. Inside the range
# nothing is divided, so ranks and energies are those of earlier versions to the bit (a Trainer checkpoint's lam
# shapes come from the ranks); outside it they are those of the weight scaled into the range.
_UNSCALED = (2.0 ** -40, 2.0 ** 40)


def _energy_scale(amax: float) -> float:
    """1, or for ``amax`` outside ``_UNSCALED`` the power of two 2**(e-1) with ``amax = m * 2**e``, m in [0.5, 1):
    ``amax`` divided by it lies in [1, 2)."""
    if not (0.0 < amax < math.inf) or _UNSCALED[0] <= amax <= _UNSCALED[1]:
        return 1.0
    return math.ldexp(0.5, math.frexp(amax)[1])


def _scaled(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``t / scale`` in ``dtype``; ``t`` itself (detached) when scale is 1. The division runs in float64, where
    every such power of two is representable (not in float32: 2**-140 for a weight at 1e-42), and is exact."""
    t = t.detach()
    if scale == 1.0:
        return t if t.dtype == dtype else t.to(dtype)
    return (t.to(torch.float64) / scale).to(dtype)


def _weight_energy(weight: torch.Tensor, needed: bool = True) -> _Energy:
    """``||W||_F^2`` (as an ``_Energy``), without a converted copy of a weight in range; refuses an all-zero weight.
    The diag rule with tau reads only R's diagonal: ``needed=False`` skips the sum."""
    from .qr import largest_magnitudes
    (amax,) = largest_magnitudes(weight)
    # An exact test: float32 squares of a weight at 1e-25 underflow to zero, but the weight is not zero.
    if amax == 0:
        raise ValueError("weight is all zeros: it has no energy to capture and no basis")
    # NaN/Inf (amax not finite) is refused by qrcp itself, naming the first bad column.
    scale = _energy_scale(amax)
    if not needed:
        return _Energy(scale, None)
    compute = _compute_dtype(weight.dtype)
    if scale == 1.0:
        return _Energy(scale, torch.linalg.vector_norm(weight.detach(), dtype=compute).square())
    return _Energy(scale, torch.linalg.vector_norm(_scaled(weight, scale, compute)).square())


def _for_qrcp(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(_compute_dtype(weight.dtype))


def build_basis(weight: torch.Tensor, *, tau: float | None = None, rank: int | None = None,
                energy: str = "diag", method: str = "geqp3") -> QRLoraBasis:
    """Factorise ``weight`` with column-pivoted QR and keep the basis chosen by the rank rule.

    Exactly one of ``tau`` (energy fraction in (0, 1]) or ``rank`` (1..min(out, in)). ``energy`` selects
    how ``tau`` is read (see the module docstring); it is ignored for ``rank``. ``method`` chooses the
    pivoting: "geqp3" or "randomized" (see the module docstring).
    """
    from .qr import qrcp

    _check_weight(weight)
    _check_rule(tau, rank, energy, min(weight.shape))
    _check_method(method)
    weight_energy = _weight_energy(weight, rank is not None or energy != "diag")
    result = qrcp(_for_qrcp(weight), **_stopping_rule(tau, rank, energy, method=method))
    return _basis_from_factorisation(weight, weight_energy, result, tau, rank, energy)


# Same-shape weights are stacked into batches of at most this many bytes (the stack is a copy).
BATCH_BYTES = 1 << 30


def build_bases(weights: Sequence[torch.Tensor], *, tau: float | None = None, rank: int | None = None,
                energy: str = "diag", names: Sequence[str] | None = None,
                on_done: Callable[[int], None] | None = None,
                defer: bool = False, method: str = "geqp3",
                keep_r: bool = True) -> list[QRLoraBasis] | list[DeferredBasis]:
    """``build_basis`` of many weights, batching the factorisations of weights that share a shape.

    Weights with the same shape, dtype and device go through ``qrcp_batched`` together (the
    repeated projections of a transformer's layers), each group on its own device. Results are in
    input order and equal ``build_basis`` of each weight. ``rank`` is clamped to each weight's
    ``min(out, in)``. ``names`` label errors; ``on_done(count)`` is called as weights finish (for a
    progress bar). ``defer=True`` (diag rule with ``tau`` only; what a global budget uses) returns
    ``DeferredBasis`` objects: the factorisations form no Q, and ``truncate`` forms Q_r later.
    ``method="randomized"`` factorises the weights one at a time, each with the same seed (a batch would
    seed each matrix by its place in it), and cannot be deferred. ``keep_r=False`` (layers that keep Q only) drops
    each basis's R as soon as its energy is known (R is then None), so that R is never held for every weight at once.
    """
    _check_method(method)
    if defer and (rank is not None or energy != "diag" or method != "geqp3"):
        raise ValueError("defer=True needs the diag rule with tau and geqp3 pivoting (it keeps R's "
                         "decreasing diagonal for a budget)")
    from .qr import qrcp, qrcp_batched

    names = list(names) if names is not None else [f"weight {i}" for i in range(len(weights))]
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} names for {len(weights)} weights")
    # Every weight is checked before any factorisation starts; the compute-dtype copies are made one
    # chunk at a time (a half-precision model's float32 copies all at once could exceed memory).
    energies, groups = [], {}
    for i, (weight, name) in enumerate(zip(weights, names)):
        try:
            _check_weight(weight)
            r = None if rank is None else min(rank, min(weight.shape))
            _check_rule(tau, r, energy, min(weight.shape))
            energies.append(_weight_energy(weight, rank is not None or energy != "diag"))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
        groups.setdefault((tuple(weight.shape), weight.dtype, weight.device, r), []).append(i)

    out: list[QRLoraBasis | None] = [None] * len(weights)
    for (shape, dtype, _, r), members in groups.items():
        matrix_bytes = max(1, shape[0] * shape[1] * torch.finfo(_compute_dtype(dtype)).bits // 8)
        chunk = max(1, min(len(members), BATCH_BYTES // matrix_bytes)) if method == "geqp3" else 1
        rule = _stopping_rule(tau, r, energy, defer, method)
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            try:
                if len(part) == 1:
                    results = [qrcp(_for_qrcp(weights[part[0]]), **rule)]
                else:
                    results = qrcp_batched(torch.stack([_for_qrcp(weights[i]) for i in part]), **rule)
            except (TypeError, ValueError):
                # A non-finite weight: name it. qrcp's own check (which also names the first bad column)
                # refuses it before factorising anything, so no good weight is factorised again.
                for i in part:
                    if not bool(torch.isfinite(weights[i]).all()):
                        try:
                            qrcp(_for_qrcp(weights[i]), **rule)
                        except (TypeError, ValueError) as err:
                            raise type(err)(f"{names[i]}: {err}") from None
                raise
            for i, result in zip(part, results):
                out[i] = _basis_from_factorisation(weights[i], energies[i], result, tau, r, energy, defer)
                if not keep_r and not defer:
                    out[i] = out[i]._replace(R=None)
            if on_done is not None:
                on_done(len(part))
    return out


def truncate(basis: QRLoraBasis | DeferredBasis, rank: int, *, energy: str = "diag") -> QRLoraBasis:
    """The leading ``rank`` components of an existing basis, without refactorising.

    Pivoted QR is nested: the rank-k basis is the leading part of any larger one. For a global budget,
    build each module's basis once with ``build_basis(w, tau=1.0, energy="diag")`` (the full diagonal),
    then truncate to the rank each module is allotted. ``energy`` must match how ``basis`` was built:
    "diag" recomputes ``energy_captured`` from ``diag_energy``, "frobenius" (also for ``rank=`` bases) from
    the squared norms of the kept rows of R.
    """
    if energy not in ENERGY_RULES:
        raise ValueError(f"energy must be one of {ENERGY_RULES}, got {energy!r}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    rank = int(rank)
    if not 1 <= rank <= basis.rank:
        raise ValueError(f"cannot truncate a rank-{basis.rank} basis to rank {rank}; "
                         f"rank must be in [1, {basis.rank}]")
    if isinstance(basis, DeferredBasis):
        if energy != "diag":
            raise ValueError("a DeferredBasis holds diag-rule energies; truncate it with energy='diag'")
        Q, R = basis_from_pivots(basis.weight, basis.perm[:rank])
        return QRLoraBasis(Q, R, basis.perm, rank, float(basis.diag_energy[:rank].to(torch.float64).sum()),
                           basis.diag_energy)
    Q, R = basis.Q[:, :rank], basis.R[:rank]
    if energy == "diag":
        # Summed in float64 so a basis truncated here and one rebuilt from broadcast float64 energies
        # (distributed.compute_bases) report the same energy_captured.
        energy_captured = float(basis.diag_energy[:rank].to(torch.float64).sum())
        diag_energy = basis.diag_energy
    else:
        acc = _compute_dtype(basis.R.dtype)
        scale = _energy_scale(float(basis.R.detach().abs().max()))  # see _energy_scale
        kept = torch.linalg.vector_norm(_scaled(R, scale, acc)).square()
        total = torch.linalg.vector_norm(_scaled(basis.R, scale, acc)).square()
        energy_captured = float(basis.energy_captured * kept / total)
        diag_energy = basis.diag_energy[:rank]
    return QRLoraBasis(Q.contiguous(), R.contiguous(), basis.perm, rank, energy_captured, diag_energy)


def basis_from_pivots(weight: torch.Tensor, pivots: torch.Tensor):
    """Rebuild ``(Q_r, R_r)`` from the stored pivots ``perm[:r]`` with an unpivoted QR of ``W[:, pivots]``.

    With the sign convention above this equals ``build_basis``'s output up to rounding, because the QR of a
    full-column-rank matrix with a positive diagonal is unique. Cost: one unpivoted QR of an out x r block,
    much cheaper than a pivoted one.
    """
    _check_weight(weight)
    if not isinstance(pivots, torch.Tensor) or pivots.dtype not in (torch.int32, torch.int64):
        raise TypeError("pivots must be an int32/int64 tensor of column indices")
    if pivots.dim() != 1 or pivots.numel() == 0:
        raise ValueError(f"pivots must be a non-empty 1-D tensor, got shape {tuple(pivots.shape)}")
    out_features, in_features = weight.shape
    r = pivots.numel()
    if r > min(out_features, in_features):
        raise ValueError(f"{r} pivots exceed min(out_features, in_features) = {min(out_features, in_features)}")
    pivots = pivots.to(device=weight.device, dtype=torch.int64)
    if int(pivots.min()) < 0 or int(pivots.max()) >= in_features:
        raise ValueError(f"pivots must lie in [0, {in_features}), got range "
                         f"[{int(pivots.min())}, {int(pivots.max())}]")
    if torch.unique(pivots).numel() != r:
        raise ValueError("pivots contain repeated column indices")

    w = weight.detach().to(_compute_dtype(weight.dtype))
    Q, R_block = torch.linalg.qr(w[:, pivots], mode="reduced")
    Q_r, _ = _normalise_signs(Q, R_block)
    R_r = Q_r.t() @ w
    return Q_r.to(weight.dtype), R_r.to(weight.dtype)
