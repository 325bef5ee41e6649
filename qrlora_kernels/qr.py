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
``|R_ii|`` is non-increasing. On the CPU its results (pivots, R, the Householder vectors and Q)
are bit-identical at any thread count. ``method="randomized"`` picks blocks of pivots from a Gaussian
sketch (HQRRP): about the speed of unpivoted QR, rank-revealing in practice, but ``|R_ii|``
is only approximately non-increasing and the pivots differ from geqp3's.

Output (``mode``, named as in ``torch.linalg.qr`` and ``numpy.linalg.qr``):

* ``"reduced"`` (default): ``QRCPResult(Q, R, perm)`` as above.
* ``"r"``: ``QRCPResult`` with an empty ``Q``; Q is never formed.
* ``"raw"``: ``QRCPRawResult(H, tau, perm)``, LAPACK geqp3's compact Householder form (what
  ``torch.geqrf`` returns, plus the pivots): ``H`` is m x n, its first k columns
  hold the Householder vectors below the diagonal, ``R = triu(H[:k])``, ``tau`` has length k, and
  ``H[k:, k:]`` is unspecified. ``.q(r)`` forms only the leading r columns of Q (only the first
  r reflectors are needed), ``.r()`` gives R, and ``torch.ormqr`` applies Q without forming it.
  Forming all of Q costs about as much as the factorisation itself, so callers that need few of
  its columns, or none, should ask for ``"raw"`` or ``"r"``.

float32/float64 inputs are factored in their own precision; float16/bfloat16 are factored in
float32 and the results are float32. A matrix at a subnormal scale (largest |entry| below the square root of
the smallest normal number) is factored times a power of two, which is exact, and R scaled back. Results live
on the input's device (CPU or CUDA; meta tensors are refused). ``qrcp`` is not differentiable.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
from typing import NamedTuple

import torch

from . import _extension

METHODS = ("geqp3", "randomized")
MODES = ("reduced", "r", "raw")


class QRCPResult(NamedTuple):
    Q: torch.Tensor
    R: torch.Tensor
    perm: torch.Tensor


class QRCPRawResult(NamedTuple):
    """``qrcp(..., mode="raw")``: compact Householder form ``(H, tau)`` plus the pivots."""
    H: torch.Tensor
    tau: torch.Tensor
    perm: torch.Tensor

    @property
    def rank(self) -> int:
        """k, the number of columns factored."""
        return self.tau.shape[0]

    def q(self, columns: int | None = None) -> torch.Tensor:
        """The leading ``columns`` (default k) columns of Q, from the first ``columns`` reflectors only."""
        c = self.rank if columns is None else columns
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= self.rank:
            raise ValueError(f"columns must be an int in [0, {self.rank}], got {columns!r}")
        c = int(c)
        if c == 0:
            return self.H.new_zeros(self.H.shape[0], 0)
        # Detached: like qrcp itself, forming Q is not differentiable (raw results of a weight that
        # requires grad still carry requires_grad).
        H, tau = self.H[:, :c].detach(), self.tau[:c].detach()
        if not H.is_cpu:
            # What the op runs on CUDA too (cuSOLVER orgqr); also serves a CPU-only build's CUDA results.
            return torch.linalg.householder_product(H, tau).contiguous()
        _extension.load()
        with _full_float32(H.device):
            return torch.ops.qrlora.householder_q(H, tau)

    def r(self) -> torch.Tensor:
        """R, k x n upper trapezoidal."""
        return torch.triu(self.H[:self.rank]).contiguous()


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
    # Any integer or real number (numpy's too), not a bool; _prepare passes them on as int / float.
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"qrcp: {name} must be {'an int' if integer else 'a real number'}, got {type(value).__name__}")
    if not integer and math.isnan(value):
        raise ValueError(f"qrcp: {name} is NaN")


_AMINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def largest_magnitudes(A: torch.Tensor, *, batched: bool = False) -> list[float]:
    """max |entry| of ``A``, or of each matrix of a batch (a list either way): one reduction pass, no mask or
    copy, one read-back; NaN and Inf reach it. Other floating dtypes (float8) are read through float32."""
    values = A.detach() if A.dtype in _AMINMAX_DTYPES else A.detach().float()
    low, high = torch.aminmax(values.reshape(A.shape[0], -1), dim=1) if batched else torch.aminmax(values)
    return torch.maximum(-low, high).reshape(-1).tolist()


def _validate(A, rank, tau, abstol, reltol, method, mode, *, batched=False):
    """Refuses what qrcp cannot factor; returns each matrix's largest |entry| (a list, one value for a 2-D A)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"qrcp: A must be a torch.Tensor, got {type(A).__name__}")
    if batched and A.dim() != 3:
        raise ValueError(f"qrcp_batched: A must be a batch of matrices (B x m x n), got {A.dim()} dimensions "
                         f"(shape {tuple(A.shape)})")
    if not batched and A.dim() != 2:
        raise ValueError(f"qrcp: A must be a 2-D matrix, got {A.dim()} dimensions (shape {tuple(A.shape)})")
    if A.is_complex():
        raise TypeError(f"qrcp: complex matrices are not supported (dtype {A.dtype})")
    if not A.is_floating_point():
        raise TypeError(f"qrcp: A must be floating point, got dtype {A.dtype}")
    if method not in METHODS:
        raise ValueError(f"qrcp: unknown method {method!r}; expected one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"qrcp: unknown mode {mode!r}; expected one of {MODES}")
    m, n = A.shape[-2:]
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
    if A.device.type not in ("cpu", "cuda"):
        # The op has CPU and CUDA kernels only; a meta tensor has no values to factor (and k, under the
        # tolerance and energy rules, depends on them).
        raise ValueError(f"qrcp: A is on the {A.device} device; qrcp factors matrices on the CPU or a CUDA "
                         f"device")
    if not A.numel():
        return [0.0] * (A.shape[0] if batched else 1)
    # The largest |entry| of each matrix (NaN and Inf reach it), which also tells a subnormal-scale matrix (see
    # _rescaling).
    amax = largest_magnitudes(A, batched=batched)
    if not all(math.isfinite(a) for a in amax):
        finite = torch.isfinite(A)
        if batched:
            b = int((~finite).flatten(1).any(1).nonzero()[0, 0])
            col = int((~finite[b]).any(dim=0).nonzero()[0, 0])
            raise ValueError(f"qrcp_batched: matrix {b} contains NaN or Inf (first in column {col})")
        col = int((~finite).any(dim=0).nonzero()[0, 0])
        raise ValueError(f"qrcp: A contains NaN or Inf (first in column {col})")
    return amax


def _prepare(A, rank, tau, abstol, reltol, method, mode, block_size, seed):
    """(the matrix the op factors, the op's argument list after A)."""
    _extension.load()
    work = A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32)
    if work.is_cuda and _extension.build_info()["kind"] != "cuda":
        # A CPU-only build still answers, on the CPU (warned: shown once per call site by the default filter).
        warnings.warn("qrlora_kernels was built without its CUDA sources (see qrlora_kernels.build_info() and "
                      "the install log for why): qrcp factors CUDA tensors on the CPU and returns the results on "
                      "the GPU. Reinstall with a CUDA toolkit of torch's CUDA major version for the GPU QR.",
                      RuntimeWarning, stacklevel=3)
        work = work.cpu()
    if seed is None:
        seed = int(torch.randint(0, 2**61, ())) if method == "randomized" else 0
    elif isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise ValueError(f"qrcp: _seed must be an int64, got {seed!r}")
    args = (-1 if rank is None else int(rank), -1.0 if tau is None else float(tau),
            -1.0 if abstol is None else float(abstol), -1.0 if reltol is None else float(reltol),
            method, int(block_size or 0), int(seed), mode)
    return work, args


_precision_lock = threading.Lock()
_precision_state = {"depth": 0, "restore": None}


def _onednn_reduced_precision_off():
    """Switch oneDNN's reduced-precision float32 matmuls off; returns how to switch them back (or None)."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    knob = getattr(mkldnn, "matmul", None)
    if knob is not None and hasattr(knob, "fp32_precision"):  # torch >= 2.9: per-back-end settings
        saved = knob.fp32_precision  # the effective value: "none" only when nothing above sets one
        if saved in ("ieee", "none"):
            return None
        parent = getattr(mkldnn, "fp32_precision", None)
        # A value equal to the parent's was (almost surely) inherited: give back "none", so that the
        # matmul setting keeps following its parent after the call.
        restore = "none" if saved == parent else saved
        knob.fp32_precision = "ieee"
        return lambda: setattr(knob, "fp32_precision", restore)
    saved = torch.get_float32_matmul_precision()  # older torch: one process-wide setting
    if saved == "highest":
        return None
    torch.set_float32_matmul_precision("highest")
    return lambda: torch.set_float32_matmul_precision(saved)


@contextlib.contextmanager
def _full_float32(device: torch.device):
    """float32 products in full float32 for the duration of a CPU factorisation.

    ``torch.set_float32_matmul_precision("medium")`` lets oneDNN compute every float32 matmul of the
    process in bfloat16, the QR's trailing updates and Q's formation included: a basis would lose accuracy
    and depend on the setting (Q's bits changed). There is no thread-local switch for it, so the setting
    is turned off for the call and given back after the last of any concurrent calls ends (other threads'
    float32 matmuls run in full precision meanwhile). On CUDA the op itself holds a thread-local
    ``at::NoTF32Guard`` against TF32 and nothing global changes."""
    if device.type != "cpu":
        yield
        return
    with _precision_lock:
        if _precision_state["depth"] == 0:
            _precision_state["restore"] = _onednn_reduced_precision_off()
        _precision_state["depth"] += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_state["depth"] -= 1
            if _precision_state["depth"] == 0 and _precision_state["restore"] is not None:
                _precision_state["restore"]()
                _precision_state["restore"] = None


def _nvtx(name: str, work: torch.Tensor):
    """One NVTX range per call ("qrcp/geqp3", "qrcp_batched/randomized", ...) for Nsight; no-op on the CPU."""
    return torch.cuda.nvtx.range(name) if work.is_cuda else contextlib.nullcontext()


def _rescaling(amax: list[float], dtype: torch.dtype) -> list[int]:
    """Per matrix, the power of two that a subnormal-scale matrix is factored at, or 0 (factored as it is).

    The factorisation divides by column norms and Householder pivots. When a matrix's entries lie near or
    below its dtype's smallest normal number (float32: 1.2e-38) those reciprocals overflow and subnormals
    keep few bits, so its R came out inf/NaN. A matrix whose largest |entry| is below sqrt(tiny) (float32:
    1.1e-19, float64: 1.5e-154) is factored times 2**e, which brings that entry into [0.5, 1) and is exact;
    QR commutes with the scaling (Q, the pivots, tau unchanged, R scaled), so R is scaled back after.
    Larger matrices are left alone: their factorisation is unchanged, to the bit."""
    small = math.sqrt(torch.finfo(dtype).tiny)
    return [-math.frexp(a)[1] if 0.0 < a < small else 0 for a in amax]


def _times_power_of_two(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """``t * 2**exponent`` (a new tensor), exact unless the result is subnormal. 2**exponent itself need not be
    representable in t's dtype (2**146 for a float32 matrix at 1e-44), so float32 is scaled in float64 (one
    rounding) and float64 in steps of at most 2**1000."""
    if t.dtype != torch.float64:
        return (t.to(torch.float64) * 2.0 ** exponent).to(t.dtype)
    while exponent:
        step = max(-1000, min(1000, exponent))
        t = t * 2.0 ** step
        exponent -= step
    return t


def _ldexp(x: float, exponent: int) -> float:
    try:
        return math.ldexp(x, exponent)
    except OverflowError:  # an abstol beyond the range: it stops at k = 0 either way
        return math.inf


def _rescaled_args(args: tuple, exponent: int) -> tuple:
    """The op's arguments for the matrix times 2**exponent: abstol is absolute and scales with it (the other
    rules are scale-free)."""
    abstol = args[2]
    return args[:2] + ((abstol if abstol < 0 else _ldexp(abstol, exponent)),) + args[3:]


def _scaled_back(mode: str, first, second, exponent: int):
    """The op's (first, second) outputs of a matrix factored times 2**exponent, for the matrix itself."""
    if not exponent:
        return first, second
    if mode != "raw":
        return first, _times_power_of_two(second, -exponent)  # (Q, R): R scales, Q does not
    # (H, tau): everything in H but the reflectors (below the diagonal of its first k columns) is R or
    # the trailing block, and scales.
    k = second.shape[0]
    rows = torch.arange(first.shape[0], device=first.device).unsqueeze(1)
    cols = torch.arange(first.shape[1], device=first.device)
    reflector = (rows > cols) & (cols < k)
    return torch.where(reflector, first, _times_power_of_two(first, -exponent)), second


def _result(mode: str, device, first, second, perm, *, what="qrcp: A", exponent=0):
    """The op's three outputs as the mode's named tuple, on the input's device (for a matrix factored times
    2**exponent, scaled back: see ``_rescaling``).

    A finite matrix whose column norms exceed its dtype's range (float32 entries near 3e38) factors into
    inf/NaN; R's diagonal shows it, and so do the reflectors' tau (in raw mode) or Q, and the caller is told
    instead of handed NaNs."""
    result = QRCPRawResult if mode == "raw" else QRCPResult
    first, second = _scaled_back(mode, first, second, exponent)
    out = result(first.to(device), second.to(device), perm.to(device))
    if mode == "raw":
        finite = torch.isfinite(out.H.diagonal()[:out.rank]).all() & torch.isfinite(out.tau).all()
    else:
        finite = torch.isfinite(out.R.diagonal()).all() & torch.isfinite(out.Q).all()
    if not bool(finite):
        raise ValueError(f"{what} overflows {out[0].dtype} during the factorisation (a column norm exceeds "
                         f"its range); scale it down or factor it in float64")
    return out


def qrcp(A: torch.Tensor, *, rank: int | None = None, tau: float | None = None, abstol: float | None = None,
         reltol: float | None = None, method: str = "geqp3", mode: str = "reduced",
         _block_size: int | None = None, _seed: int | None = None) -> QRCPResult | QRCPRawResult:
    """Column-pivoted QR ``A[:, perm] ~= Q @ R``; see the module docstring for the rules.

    ``_block_size`` (panel width) and ``_seed`` (randomized sketch; drawn from torch's global
    generator when omitted) are for tests and benchmarks.
    """
    amax = _validate(A, rank, tau, abstol, reltol, method, mode)
    work, args = _prepare(A, rank, tau, abstol, reltol, method, mode, _block_size, _seed)
    device = A.device
    exponent = _rescaling(amax, work.dtype)[0]
    if exponent:
        work, args = _times_power_of_two(work, exponent), _rescaled_args(args, exponent)
    with _nvtx(f"qrcp/{method}", work), _full_float32(work.device):
        if work.requires_grad and torch.is_grad_enabled():
            out = _NotDifferentiable.apply(work, args)
        else:
            out = torch.ops.qrlora.qrcp(work, *args)
    return _result(mode, device, *out, exponent=exponent)


def qrcp_batched(A: torch.Tensor, *, rank: int | None = None, tau: float | None = None,
                 abstol: float | None = None, reltol: float | None = None, method: str = "geqp3",
                 mode: str = "reduced", _block_size: int | None = None,
                 _seed: int | None = None) -> list[QRCPResult] | list[QRCPRawResult]:
    """``qrcp`` of every matrix of a batch ``A`` (B x m x n), with the same rules; one result per matrix.

    Each result equals ``qrcp(A[b], ...)`` (with the randomized sketch of matrix b seeded by
    ``_seed + b``, modulo 2**64); under the tolerance and energy rules each matrix stops at its own
    rank. On the CPU, with at least as many matrices as threads, they are factored concurrently, one
    per thread, which for a model's many same-shape weights is faster than threading inside each
    factorisation. For ``method="geqp3"`` the results are bit-identical to ``qrcp``'s either way
    (on the CPU nothing in it, forming Q included, depends on the thread count); randomized results
    agree to rounding. Not differentiable (inputs are detached).
    """
    amax = _validate(A, rank, tau, abstol, reltol, method, mode, batched=True)
    work, args = _prepare(A, rank, tau, abstol, reltol, method, mode, _block_size, _seed)
    exponents = _rescaling(amax, work.dtype)
    work = work.detach()
    with _nvtx(f"qrcp_batched/{method}", work), _full_float32(work.device):
        if not any(exponents):
            outs = zip(*torch.ops.qrlora.qrcp_batched(work, *args))
        elif abstol is None or len(set(exponents)) == 1:
            # Subnormal-scale matrices (see _rescaling), each at its own scale: the other rules are scale-free.
            work = torch.stack([_times_power_of_two(w, e) if e else w for w, e in zip(work, exponents)])
            outs = zip(*torch.ops.qrlora.qrcp_batched(work, *_rescaled_args(args, exponents[0])))
        else:
            # abstol is one absolute threshold for the whole batch: matrices at different scales are factored
            # one at a time, matrix b with the seed it has in the batch (_seed + b, modulo 2**64).
            seed = args[6]
            outs = [torch.ops.qrlora.qrcp(_times_power_of_two(w, e) if e else w, *_rescaled_args(
                        args[:6] + ((seed + b + 2**63) % 2**64 - 2**63,) + args[7:], e))
                    for b, (w, e) in enumerate(zip(work, exponents))]
    return [_result(mode, A.device, *out, what=f"qrcp_batched: matrix {b}", exponent=e)
            for b, (out, e) in enumerate(zip(outs, exponents))]
