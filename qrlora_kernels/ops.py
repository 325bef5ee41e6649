"""The fused kernels as torch ops (``torch.ops.qrlora_kernels.*``), with fake and autograd registrations.

Each op calls the Triton host functions of ``qrlora_kernels.kernels`` and nothing else; the math lives there
(and in ``kernels/reference.py``). Ops are opaque to ``torch.compile``, which traces them through their fake
implementations without graph breaks.

2-D shapes only (``functional.qrlora_linear`` flattens): x (T, K), weight (N, K), Q (N, r), R (r, K),
lam (r,) or (A, r), lam_index (T,) int64 or None. S and G are float32 (float64 for float64 inputs).

R may be None: a layer built with ``store_r=False`` keeps only Q, and its R is the implied R~ = Q^T W0 (exact
for a pivoted-QR basis; see ``QRLoraLinear``). The lowrank ops then work in the output space, where no R is
needed: S = Y0 Q with Y0 = x W0^T, y = Y0 + b + (S * lam) Q^T, and dx = (dY + (G * lam) Q^T) W0 with G = dY Q.
The merged ops form R~ inside the op, in the forward and again in the backward, and never save it: the saved
tensors would otherwise hold every layer's R~ from the forward to the backward, and peak memory would not fall.

Gradients: only x and lam get one. W0, Q, R and the bias are frozen by construction in QR-LoRA, so the
autograd formulas return None for them (``functional`` refuses inputs that would silently lose a gradient).
The ops run with autocast disabled: ``functional`` has already cast the inputs to the autocast dtype, and the
kernels accumulate in float32 regardless.

Entry points for ``functional``: ``lowrank_linear`` and ``merged_linear``. While ``torch.compile`` traces, they
call the custom ops above (opaque, traced through their fake implementations). In eager mode they call the
same implementation functions through a ``torch.autograd.Function`` instead: the custom-op dispatch adds
tens of microseconds of host time per call (measured on this CPU: ~30-55 us against ~8 us; see
``benchmarks/micro/test_op_overhead.py``), which for a training step's many small layers would exceed the
kernels' own GPU time. Both routes run the identical kernels and autograd formulas (tested bit for bit).
"""
# No `from __future__ import annotations`: custom_op reads the schema from real annotations, and older
# torch releases (2.6) cannot evaluate string ones.
import functools
from typing import Optional

import torch
from torch import Tensor

from .functional import _no_autocast, acc_dtype, implied_r

NAMESPACE = "qrlora_kernels"


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import kernels
    return kernels


class _op_scope:
    """Autocast off, and an NVTX range (``qrlora/fwd``, ``qrlora/bwd``) around the op's kernels for Nsight.

    A plain class rather than a generator-based context manager: it runs twice per layer and step, and
    costs a third as much host time."""
    __slots__ = ("range", "autocast")

    def __init__(self, name: str, device: torch.device):
        self.range = _kernels().utils.nvtx_range(name, device)
        self.autocast = _no_autocast(device)

    def __enter__(self):
        self.range.__enter__()
        self.autocast.__enter__()

    def __exit__(self, *exc):
        self.autocast.__exit__(*exc)
        self.range.__exit__(*exc)


def _num_adapters(lam: Tensor) -> int:
    return lam.shape[0] if lam.dim() == 2 else 1


# ---------------------------------------------------------------- low-rank path (a)

def _lowrank_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], Q: Tensor, R: Optional[Tensor],
                          lam: Tensor, lam_index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """y = x W0^T + b + ((x R^T) * lam) Q^T; also returns S = x R^T, saved for the backward.

    Without R: y = Y0 + b + ((Y0 Q) * lam) Q^T from the frozen GEMM's output Y0 (S = Y0 Q = x R~^T)."""
    k = _kernels()
    with _op_scope("qrlora/fwd", x.device):
        if R is not None:
            s = k.project(x, R.t())
            y = k.lowrank_matmul(x, weight.t(), s, lam, Q.t(), bias, lam_index=lam_index)
            return y, s
        # Y0 without the bias: S projected from Y0 + b would lose S to cancellation in half precision wherever
        # |b| >> |x W0^T| (the rounding of Y0 + b, relative to S, grows like |b| / |Y0|). The bias rides in the
        # update's epilogue instead.
        y = torch.nn.functional.linear(x, weight)
        s = k.project(y, Q)
        k.lowrank_update(y, s, lam, Q.t(), bias, lam_index=lam_index, out=y)  # in place: no second T x N buffer
    return y, s


lowrank_forward = torch.library.custom_op(f"{NAMESPACE}::lowrank_forward", mutates_args=())(_lowrank_forward_impl)


@lowrank_forward.register_fake
def _(x, weight, bias, Q, R, lam, lam_index):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], Q.shape[1]), dtype=acc_dtype(x.dtype)))


def _lowrank_backward_impl(dy: Tensor, weight: Tensor, Q: Tensor, R: Optional[Tensor], lam: Tensor, s: Tensor,
                           lam_index: Optional[Tensor], compute_dx: bool) -> tuple[Tensor, Tensor]:
    """(dx, dlam): G = dY Q and dlam = sum_t S*G in one pass over dY, then dx = dY W0 + (G*lam) R
    (without R: dx = (dY + (G*lam) Q^T) W0).

    dlam is float32 with lam's shape; dx is empty when ``compute_dx`` is False.
    """
    k = _kernels()
    with _op_scope("qrlora/bwd", dy.device):
        g, dlam = k.project_and_reduce(dy, Q, s, lam_index=lam_index, num_adapters=_num_adapters(lam))
        if not compute_dx:
            dx = dy.new_empty((0,))
        elif R is not None:
            dx = k.lowrank_matmul(dy, weight, g, lam, R, None, lam_index=lam_index)
        else:
            dx = torch.mm(k.lowrank_update(dy, g, lam, Q.t(), lam_index=lam_index), weight)
    return dx, dlam.reshape(lam.shape)


lowrank_backward = torch.library.custom_op(f"{NAMESPACE}::lowrank_backward",
                                           mutates_args=())(_lowrank_backward_impl)


@lowrank_backward.register_fake
def _(dy, weight, Q, R, lam, s, lam_index, compute_dx):
    dx = dy.new_empty((dy.shape[0], weight.shape[1]) if compute_dx else (0,))
    return dx, lam.new_empty(lam.shape, dtype=acc_dtype(dy.dtype))


def _lowrank_save(ctx, weight, Q, R, lam, s, lam_index):
    """What the backward needs, in the order ``_lowrank_grads`` unpacks it (both routes)."""
    ctx.save_for_backward(weight, Q, R, lam, s, lam_index)


def _lowrank_setup_context(ctx, inputs, output):
    x, weight, bias, Q, R, lam, lam_index = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    _lowrank_save(ctx, weight, Q, R, lam, s, lam_index)


def _lowrank_grads(ctx, dy, backward):
    weight, Q, R, lam, s, lam_index = ctx.saved_tensors
    compute_dx = ctx.needs_input_grad[0]
    dx, dlam = backward(dy, weight, Q, R, lam, s, lam_index, compute_dx)
    return (dx if compute_dx else None), None, None, None, None, dlam.to(lam.dtype), None


def _lowrank_backward(ctx, dy, ds):
    return _lowrank_grads(ctx, dy, lowrank_backward)


lowrank_forward.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


# ---------------------------------------------------------------- merged path (b)

@torch.library.custom_op(f"{NAMESPACE}::merged_weight", mutates_args=())
def merged_weight(weight: Tensor, Q: Tensor, R: Tensor, lam: Tensor) -> Tensor:
    """W_eff = W0 + (Q * lam) R in weight's dtype (no autograd: used by merge() and the merged forward)."""
    with _no_autocast(weight.device):
        return _kernels().merged_weight(weight, Q, lam, R)


@merged_weight.register_fake
def _(weight, Q, R, lam):
    return torch.empty_like(weight)


def _merged_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], Q: Tensor, R: Optional[Tensor],
                         lam: Tensor) -> tuple[Tensor, Tensor]:
    """y = x W_eff^T + b with W_eff = W0 + (Q*lam) R built by one kernel (R = Q^T W0 when None); returns
    (y, W_eff)."""
    with _op_scope("qrlora/fwd", x.device):
        w_eff = _kernels().merged_weight(weight, Q, lam, implied_r(weight, Q) if R is None else R)
        y = torch.nn.functional.linear(x, w_eff, bias)
    return y, w_eff


merged_forward = torch.library.custom_op(f"{NAMESPACE}::merged_forward", mutates_args=())(_merged_forward_impl)


@merged_forward.register_fake
def _(x, weight, bias, Q, R, lam):
    return x.new_empty((x.shape[0], weight.shape[0])), torch.empty_like(weight)


def _merged_backward_impl(dy: Tensor, x: Tensor, weight: Tensor, w_eff: Tensor, Q: Tensor, R: Optional[Tensor],
                          lam: Tensor, dlam_route: str, compute_dx: bool) -> tuple[Tensor, Tensor]:
    """(dx, dlam) with dx = dY W_eff and dlam by ``dlam_route``: "project" (S = x R^T, then G = dY Q and
    sum_t S*G in one pass) or "weight_grad" (diag(Q^T (dY^T x) R^T)). dlam is float32 with lam's shape.
    R = Q^T W0 is formed again here when None (never saved from the forward)."""
    k = _kernels()
    with _op_scope("qrlora/bwd", dy.device):
        if dlam_route not in ("project", "weight_grad"):
            raise ValueError(f"dlam_route must be 'project' or 'weight_grad', got {dlam_route!r}")
        if R is None:
            R = implied_r(weight, Q)
        if dlam_route == "project":
            s = k.project(x, R.t())
            _, dlam = k.project_and_reduce(dy, Q, s)
        else:
            dlam = k.dlam_via_weight_grad(dy, x, Q, R)
        dx = dy @ w_eff if compute_dx else dy.new_empty((0,))
    return dx, dlam.reshape(lam.shape).to(acc_dtype(dy.dtype))


merged_backward = torch.library.custom_op(f"{NAMESPACE}::merged_backward",
                                          mutates_args=())(_merged_backward_impl)


@merged_backward.register_fake
def _(dy, x, weight, w_eff, Q, R, lam, dlam_route, compute_dx):
    dx = dy.new_empty((dy.shape[0], w_eff.shape[1]) if compute_dx else (0,))
    return dx, lam.new_empty(lam.shape, dtype=acc_dtype(dy.dtype))


def _merged_save(ctx, x, weight, w_eff, Q, R, lam):
    """What the backward needs, in the order ``_merged_grads`` unpacks it (both routes). ``weight`` only where R is
    None, to form R again (it is then the frozen parameter itself: ``functional`` passes R instead when autocast
    has made a copy of the weight, which would otherwise be kept)."""
    ctx.save_for_backward(x, weight if R is None else None, w_eff, Q, R, lam)


def _merged_setup_context(ctx, inputs, output):
    x, weight, bias, Q, R, lam = inputs
    _, w_eff = output
    ctx.mark_non_differentiable(w_eff)
    _merged_save(ctx, x, weight, w_eff, Q, R, lam)


def _merged_grads(ctx, dy, backward):
    from .dispatch import choose_dlam_route

    x, weight, w_eff, Q, R, lam = ctx.saved_tensors
    compute_dx = ctx.needs_input_grad[0]
    route = choose_dlam_route(x.shape[0], w_eff.shape[0], w_eff.shape[1], Q.shape[1],
                              elem_bytes=x.element_size())
    dx, dlam = backward(dy, x, weight, w_eff, Q, R, lam, route, compute_dx)
    return (dx if compute_dx else None), None, None, None, None, dlam.to(lam.dtype)


def _merged_backward(ctx, dy, dw_eff):
    return _merged_grads(ctx, dy, merged_backward)


merged_forward.register_autograd(_merged_backward, setup_context=_merged_setup_context)


# ---------------------------------------------------------------- entry points: custom ops or eager Functions

def _refuse_higher_order() -> None:
    """The kernels' backward has no backward of its own. A backward that records a graph (``create_graph=True``:
    a gradient penalty, a Hessian-vector product) would give gradients missing this layer's part, or torch's
    "appears to not have been used in the graph": refused, naming the backend that has them."""
    if torch.is_grad_enabled():
        raise RuntimeError("QR-LoRA's Triton kernels have no second derivative, and this backward was asked for a "
                           "graph (create_graph=True, e.g. a gradient penalty): use backend='torch' "
                           "(QRLoraLinear(..., backend='torch') or qrlora_linear(..., backend='torch')), whose "
                           "gradients are differentiable")


class _EagerLowrank(torch.autograd.Function):
    """``lowrank_forward`` and its registered autograd formula, without the custom-op dispatch."""

    # Only y is an output: S stays inside ctx (the custom op must return it, which costs host time).
    @staticmethod
    def forward(ctx, x, weight, bias, Q, R, lam, lam_index):
        y, s = _lowrank_forward_impl(x, weight, bias, Q, R, lam, lam_index)
        _lowrank_save(ctx, weight, Q, R, lam, s, lam_index)
        return y

    @staticmethod
    def backward(ctx, dy):
        _refuse_higher_order()
        with torch.no_grad():
            return _lowrank_grads(ctx, dy, _lowrank_backward_impl)


class _EagerMerged(torch.autograd.Function):
    """``merged_forward`` and its registered autograd formula, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, Q, R, lam):
        y, w_eff = _merged_forward_impl(x, weight, bias, Q, R, lam)
        _merged_save(ctx, x, weight, w_eff, Q, R, lam)
        return y

    @staticmethod
    def backward(ctx, dy):
        _refuse_higher_order()
        with torch.no_grad():
            return _merged_grads(ctx, dy, _merged_backward_impl)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], Q: Tensor, R: Optional[Tensor], lam: Tensor,
                   lam_index: Optional[Tensor]) -> Tensor:
    """The lowrank strategy's y: the custom op while ``torch.compile`` traces, the eager Function otherwise."""
    if torch.compiler.is_compiling():
        return lowrank_forward(x, weight, bias, Q, R, lam, lam_index)[0]
    return _EagerLowrank.apply(x, weight, bias, Q, R, lam, lam_index)


def merged_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], Q: Tensor, R: Optional[Tensor],
                  lam: Tensor) -> Tensor:
    """The merged strategy's y: the custom op while ``torch.compile`` traces, the eager Function otherwise."""
    if torch.compiler.is_compiling():
        return merged_forward(x, weight, bias, Q, R, lam)[0]
    return _EagerMerged.apply(x, weight, bias, Q, R, lam)
