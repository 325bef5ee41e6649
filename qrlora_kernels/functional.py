"""``qrlora_linear``: the QR-LoRA linear layer as a function.

    y = x W0^T + b + ((x R^T) * lam) Q^T          (= x (W0 + Q diag(lam) R)^T + b)

Backends:

* ``"triton"`` -- the fused Triton kernels through the ``torch.ops.qrlora_kernels`` ops. On CPU tensors they
  run under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before ``qrlora_kernels.kernels``
  is imported. Only x and lam receive gradients.
* ``"torch"`` -- plain differentiable torch (``F.linear`` plus the two projections): every input gets its
  gradient, and it is gradcheck-able in float64.
* ``None`` -- "triton" for CUDA tensors, "torch" otherwise (and under ``torch.func`` transforms such as
  ``vmap`` or ``grad``, which the kernels have no rules for: ``backend="triton"`` refuses them).

Strategy ("lowrank" or "merged", see ``dispatch``): the ``strategy=`` argument, ``$QRLORA_STRATEGY``, or the
cost model. Both backends implement both strategies with the same results up to rounding.

Dtype rule: x, weight, bias, Q and R must share one floating dtype (as ``F.linear`` requires). lam may have
any floating dtype (e.g. float32 master weights for a bfloat16 model); it is applied in float32 (float64 for
float64 inputs) on both backends, and its gradient comes back in lam's own dtype. Under autocast
(``torch.autocast`` enabled for x's device), x, weight, bias, Q and R are cast to the autocast dtype first,
like ``F.linear`` under autocast, and lam is left as it is.

Without R (``R=None``, what a ``QRLoraLinear(store_r=False)`` passes): the basis is Q alone and R is the implied
R~ = Q^T W0, which for a pivoted-QR basis is exactly the stored R (first r rows of R, columns in W0's order). The
update is then a scaled projection in the output space, y = Y0 + b + ((Y0 Q) * lam) Q^T with Y0 = x W0^T, and
that is how the lowrank strategy computes it (no R needed, in the forward or the backward); the merged
strategy forms R~ when it builds W_eff (see ``ops``). Q must then have orthonormal columns. Accuracy: S then comes
from a rounded intermediate (Y0, or R~), so in half precision each S_ti is accurate to about u * |Y0_t| rather than
to itself: a component whose S is tiny against Y0 loses relative accuracy. On real weights and activations this
does not show (all-MiniLM-L6-v2, fp16: dlam's relative error 5e-4 with R and without).

Multi-adapter batches: lam of shape (A, r) holds one row per adapter, all sharing Q and R. ``adapter_ids``
picks the rows: per sequence, shape ``x.shape[:-2]`` (for x (B, L, K): (B,), repeated over the L tokens; for
2-D x, a 0-d id applies to every token), or per token, shape ``x.shape[:-1]``. With lam (A, r), A > 1,
adapter_ids is required; multi-adapter batches always take the lowrank strategy.
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
import torch.nn.functional as F

from . import dispatch

BACKENDS = ("triton", "torch")


def _triton_release() -> tuple[int, int] | None:
    """Triton's (major, minor) from its package metadata (without importing it: torch's ROCm, XPU and nightly builds
    ship it under their own names), or None if unknown."""
    from importlib.metadata import PackageNotFoundError, version
    for package in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return tuple(int(part) for part in version(package).split(".")[:2])
        except (PackageNotFoundError, ValueError):
            continue
    return None


# Triton 3.2 to 3.4 (torch 2.6 to 2.8) have no float64 tl.dot ("Unsupported lhs dtype fp64"); 3.5 and newer have
# one. Where it is missing, float64 goes to the torch backend when the backend is automatic (here and in
# QRLoraLinear's merge), and backend="triton" refuses it. Read once, at import: dynamo cannot trace it.
TRITON_RELEASE = _triton_release()
TRITON_FLOAT64_DOT = (TRITON_RELEASE or (99, 0)) > (3, 4)


def triton_dot_takes(dtype: torch.dtype) -> bool:
    """Whether this Triton's tl.dot takes ``dtype`` (every dtype we use, except float64 on Triton 3.2 to 3.4)."""
    return dtype != torch.float64 or TRITON_FLOAT64_DOT


_AUTOCASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name, t, *, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _validate(x, weight, bias, Q, R, lam):
    """Shapes, dtypes and devices (``qrlora_linear`` has already checked that the arguments are tensors)."""
    _check_tensor("lam", lam)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has last dimension {x.shape[-1]} but weight has in_features {in_features} "
                         f"(weight shape {tuple(weight.shape)})")
    if Q.dim() != 2 or (R is not None and R.dim() != 2):
        raise ValueError(f"Q and R must be 2-D, got shapes {tuple(Q.shape)} and "
                         f"{None if R is None else tuple(R.shape)}")
    r = Q.shape[1]
    if Q.shape[0] != out_features:
        raise ValueError(f"Q has {Q.shape[0]} rows but weight has out_features {out_features}")
    if R is not None and R.shape != (r, in_features):
        raise ValueError(f"R has shape {tuple(R.shape)}, expected (rank, in_features) = ({r}, {in_features}) "
                         f"from Q {tuple(Q.shape)} and weight {tuple(weight.shape)}")
    if r < 1:
        raise ValueError("the basis has rank 0 (Q has no columns)")
    if not ((lam.dim() == 1 and lam.shape[0] == r) or (lam.dim() == 2 and lam.shape[1] == r and lam.shape[0] >= 1)):
        raise ValueError(f"lam has shape {tuple(lam.shape)}, expected ({r},) or (num_adapters, {r}) for rank {r}")
    if not lam.is_floating_point():
        raise TypeError(f"lam must be a floating-point tensor, got dtype {lam.dtype}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    named = [("weight", weight), ("Q", Q), ("R", R), ("lam", lam), ("bias", bias)]
    named = [(name, t) for name, t in named if t is not None]
    device, dtype = x.device, x.dtype
    for name, t in named:
        if t.device != device:
            raise ValueError(f"mixed devices: x is on {x.device} but {name} is on {t.device}")
    for name, t in named:
        if name != "lam" and t.dtype != dtype:
            raise TypeError(f"mixed dtypes: x is {x.dtype} but {name} is {t.dtype} "
                            f"(x, weight, bias, Q and R must share a dtype; only lam may differ)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What carries lam and the projections: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def implied_r(weight: torch.Tensor, Q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """R~ = Q^T W0 (r x in) in ``dtype`` (default: weight's): the R of a layer that keeps Q only."""
    dtype = weight.dtype if dtype is None else dtype
    return Q.to(dtype).t() @ weight.to(dtype)


def _autocast_enabled(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for a device type autocast does not know (meta tensors, which the torch
    # backend otherwise computes shapes for like any other op). CPU and CUDA skip the availability check, which
    # torch.compile cannot trace on torch 2.11 (a graph break under fullgraph=True).
    if device_type in ("cpu", "cuda"):
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _no_autocast(device: torch.device):
    """Autocast off for what follows (the inputs are already cast); a free no-op when it is off already."""
    if _autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast(x, weight, bias, Q, R):
    """Cast to the autocast dtype when autocast is on for x's device, as F.linear would."""
    device_type = x.device.type
    if not _autocast_enabled(device_type):
        return x, weight, bias, Q, R
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in _AUTOCASTABLE else t

    return cast(x), cast(weight), cast(bias), cast(Q), cast(R)


_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))

# (min, max) of CUDA ids tensors, by id(tensor): (weakref to it, its version counter, min, max). A few entries:
# one per device of a model-level context, and the ids expanded from them inside generate().
_ID_RANGES: dict = {}
_ID_RANGES_KEPT = 8


def read_id_range(adapter_ids) -> tuple[int, int]:
    """(min, max) of a non-empty ids tensor, read back at once (on CUDA one host sync, not two)."""
    return tuple(torch.stack(torch.aminmax(adapter_ids)).tolist())


def id_range_kept(adapter_ids) -> bool:
    """Whether ``adapter_ids``'s range (and what is derived from it) is remembered: not for CPU ids, cheap to
    measure again (and where writes through ``.data`` or numpy, which leave the version counter alone, are
    common), nor inference tensors, which have no version counter."""
    return not adapter_ids.is_inference() and adapter_ids.device.type != "cpu"


def remember_id_range(adapter_ids: torch.Tensor, low: int, high: int) -> None:
    """Record that ``adapter_ids`` holds values in [low, high] (measured by the caller), so the layers given it
    do not read it back to check it. Kept while the tensor lives, by its version counter, which writes through
    ``.data`` or a shared numpy array do not bump."""
    if not id_range_kept(adapter_ids):
        return
    if len(_ID_RANGES) >= _ID_RANGES_KEPT and id(adapter_ids) not in _ID_RANGES:
        _ID_RANGES.pop(next(iter(_ID_RANGES)))
    _ID_RANGES[id(adapter_ids)] = (weakref.ref(adapter_ids), adapter_ids._version, low, high)


def known_id_range(adapter_ids: torch.Tensor):
    """(min, max) recorded by ``remember_id_range`` for this tensor at its current version, else None."""
    entry = _ID_RANGES.get(id(adapter_ids)) if id_range_kept(adapter_ids) else None
    if entry is not None and entry[0]() is adapter_ids and adapter_ids._version == entry[1]:
        return entry[2], entry[3]
    return None


def _id_range(adapter_ids):
    """(min, max) of the ids. On CUDA this syncs with the host, so it is remembered: a model-level context hands
    the same ids tensor to every layer (and records its range first), and only a layer that meets a new
    tensor pays."""
    known = known_id_range(adapter_ids)  # (None, and nothing remembered below, for CPU or inference ids)
    if known is not None:
        return known
    low, high = read_id_range(adapter_ids)
    remember_id_range(adapter_ids, low, high)
    return low, high


def _lam_index(adapter_ids, x, num_adapters):
    """Per-token adapter index (T,) int64 from per-sequence or per-token ids; validated."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor, got dtype {adapter_ids.dtype}")
    if adapter_ids.dtype in _WIDE_UNSIGNED:
        # torch has barely any kernels for these (no min/max, so no range check): refused rather than copied on
        # every call.
        raise TypeError(f"adapter_ids must be a signed integer (or uint8) tensor, got dtype {adapter_ids.dtype}, "
                        f"which torch supports few operations on; pass adapter_ids.long()")
    if adapter_ids.device != x.device:
        raise ValueError(f"mixed devices: x is on {x.device} but adapter_ids is on {adapter_ids.device}")
    tokens_per_sequence = x.shape[-2] if x.dim() >= 2 else 1
    if adapter_ids.shape == x.shape[:-1]:
        index = adapter_ids.reshape(-1)
    elif adapter_ids.shape == x.shape[:-2]:
        # (expand, not repeat_interleave, which reads its repeats back from the device on some torch releases)
        index = adapter_ids.reshape(-1, 1).expand(-1, tokens_per_sequence).reshape(-1)
    else:
        raise ValueError(f"adapter_ids has shape {tuple(adapter_ids.shape)}; expected per-sequence ids of shape "
                         f"{tuple(x.shape[:-2])} or per-token ids of shape {tuple(x.shape[:-1])} for x of shape "
                         f"{tuple(x.shape)}")
    # A data-dependent check: skipped while compiling (it would break the graph; the ids are then trusted) and
    # for meta tensors (no values).
    if not torch.compiler.is_compiling() and index.numel() > 0 and not index.is_meta:
        low, high = _id_range(adapter_ids)
        if low < 0 or high >= num_adapters:
            bad = low if low < 0 else high
            raise ValueError(f"adapter id {bad} is out of range for {num_adapters} adapter(s) "
                             f"(valid ids: 0..{num_adapters - 1})")
    # The kernels read the ids as a contiguous vector: a strided view (ids[::2], an expand) is copied.
    return index.to(torch.int64).contiguous()


def _func_transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running. Not asked while compiling: dynamo
    traces the transforms itself, and the kernels enter its graph as custom ops."""
    if torch.compiler.is_compiling():
        return False
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def _check_triton_available(x):
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors under Triton's interpreter), but x "
                         f"is on {x.device}; use backend='torch' (or None)")
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors runs the kernels under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing qrlora_kernels (or use backend='torch')")
    if not triton_dot_takes(x.dtype):
        raise TypeError(f"backend='triton' cannot take float64 with Triton {'.'.join(map(str, TRITON_RELEASE))}, "
                        f"which has no float64 tl.dot; use backend='torch' (or None, which picks it)")
    if _func_transformed():
        raise RuntimeError("backend='triton' cannot run under torch.func transforms (vmap, grad, jacrev, ...): the "
                           "kernels have no batching or functional-autograd rules; use backend='torch' (or None, "
                           "which picks it there)")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # The interpreter computes in numpy, which has no bfloat16: the results would be garbage.
        raise TypeError("backend='triton' on CPU tensors cannot take bfloat16 (Triton's interpreter has no "
                        "bfloat16); use float32/float16, backend='torch', or a CUDA device")


def _torch_path(x2, weight, bias, Q, R, lam, lam_index, strategy, wide=None):
    # ``wide``: (x2, Q, R) as given, before autocast cast them (None: the same tensors). The basis, and
    # the lowrank correction's x, are read from those, not from their autocast copies cast back up: a float32
    # basis under bf16 autocast was cast to bf16 and back on every call, and the float32 copies were saved for
    # the backward. What lam = 0 leaves (the frozen GEMM; merged: x and W0) takes the autocast copies, so that
    # there the layer computes exactly as autocast's F.linear.
    # What carries lam is kept in float32 (float64 for float64 inputs), like the kernels' accumulators: dlam
    # reduces over every token and loses too much in half precision. Lowrank: the (T, r) projections, lam
    # and the correction are computed in float32, the frozen GEMM in the input dtype. Merged: plain autograd
    # gets dlam from the gradient of W_eff, dY^T x, whose half-precision rounding cancellation can amplify past
    # the fp16 band; so for half inputs this reference path runs that GEMM in float32 (slow on GPUs: use
    # backend="triton" for speed).
    # With R, at lam = 0 the lowrank result is exactly F.linear's, because the correction is an exact zero.
    acc = acc_dtype(x2.dtype)
    x_w, Q_w, R_w = wide if wide is not None else (x2, Q, R)
    lam_rows = lam.to(acc)
    if lam_index is not None:
        lam_rows = lam_rows.index_select(0, lam_index)
    # Without R (R~ = Q^T W0): merged forms R~ in the accumulator dtype; lowrank projects the frozen output Y0
    # (without the bias, which could swamp it in half precision) and adds the bias last.
    if strategy == "merged":  # x and W0 as autocast gave them: at lam = 0 this is autocast's F.linear
        R_acc = implied_r(weight, Q_w, acc) if R_w is None else R_w.to(acc)
        w_eff = weight.to(acc) + (Q_w.to(acc) * lam_rows) @ R_acc
        y = F.linear(x2.to(acc), w_eff, None if bias is None else bias.to(acc))
        return y.to(x2.dtype)
    # The low-rank products run in the accumulator dtype too: in half precision S = x R^T (or Y0 Q) and S * lam
    # can exceed float16's range where y does not (a large component of y that lam mostly cancels).
    if R is None:
        y0 = F.linear(x2, weight).to(acc)
        Q_acc = Q_w.to(acc)
        y = (y0 + ((y0 @ Q_acc) * lam_rows) @ Q_acc.t()).to(x2.dtype)
        return y if bias is None else y + bias
    scaled = (x_w.to(acc) @ R_w.t().to(acc)) * lam_rows
    return (F.linear(x2, weight, bias).to(acc) + scaled @ Q_w.t().to(acc)).to(x2.dtype)


def qrlora_linear(x, weight, bias, Q, R, lam, *, backend=None, adapter_ids=None, strategy=None):
    """y = x W0^T + b + ((x R^T) * lam) Q^T for x of shape (..., in_features); returns (..., out_features).

    ``weight`` (N, K), ``bias`` (N,) or None, ``Q`` (N, r), ``R`` (r, K) in W0's column order or None (then
    R = Q^T W0), ``lam`` (r,) or (A, r). See the module docstring for ``backend``, ``adapter_ids``, ``strategy`` and the dtype rule.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for name, t in (("x", x), ("weight", weight), ("Q", Q)):
        _check_tensor(name, t)
    _check_tensor("bias", bias, optional=True)
    _check_tensor("R", R, optional=True)
    own_x, own_weight, own_Q, own_R = x, weight, Q, R
    x, weight, bias, Q, R = _autocast(x, weight, bias, Q, R)
    _validate(x, weight, bias, Q, R, lam)
    if backend is None:
        backend = ("triton" if x.device.type == "cuda" and triton_dot_takes(x.dtype) and not _func_transformed()
                   else "torch")

    out_features, in_features = weight.shape
    rank = Q.shape[1]
    num_adapters = lam.shape[0] if lam.dim() == 2 else 1
    lam_index = None
    if adapter_ids is not None:
        lam_index = _lam_index(adapter_ids, x, num_adapters)
        if num_adapters == 1:
            lam_index = None  # one adapter, (r,) or (1, r): the ids are all 0 (checked above) and select nothing
    elif num_adapters > 1:
        raise ValueError(f"lam holds {num_adapters} adapters (shape {tuple(lam.shape)}); pass adapter_ids to pick "
                         "one per sequence or token")
    if lam.dim() == 2 and lam_index is None:
        lam = lam.reshape(rank)  # one row: the single-adapter case (a view, so lam's grad keeps its shape)

    flat = x.dim() == 2  # the common case needs no reshapes (a few microseconds each)
    leading = x.shape[:-1]
    x2 = x if flat else x.reshape(-1, in_features)
    tokens = x2.shape[0]
    training = torch.is_grad_enabled() and lam.requires_grad
    chosen = dispatch.choose_strategy(tokens, out_features, in_features, rank, training=training,
                                      per_token_lam=lam_index is not None, elem_bytes=x.element_size(),
                                      r_stored=R is not None, strategy=strategy)

    if backend == "torch":
        wide = None
        if any(a is not b for a, b in zip((x, Q, R), (own_x, own_Q, own_R))):  # autocast cast them
            wide = (own_x if flat else own_x.reshape(-1, in_features), own_Q, own_R)
        with _no_autocast(x.device):
            y = _torch_path(x2, weight, bias, Q, R, lam, lam_index, chosen, wide)
        return y if flat else y.reshape(*leading, out_features)

    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias), ("Q", Q), ("R", R)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but backend='triton' computes gradients for x and lam "
                                 "only (QR-LoRA freezes W0, bias, Q and R); freeze it or use backend='torch'")
    _check_triton_available(x)
    from . import ops

    if chosen == "merged":
        if R is None and weight is not own_weight:
            # Autocast made a copy of the weight. The merged op would keep it (N x K) for its backward, to form R
            # there; R itself (r x K, what a store_r=True layer's cast R costs) is the smaller thing to keep.
            with _no_autocast(x.device):
                R = implied_r(weight, Q)
        y = ops.merged_linear(x2, weight, bias, Q, R, lam)
    else:
        y = ops.lowrank_linear(x2, weight, bias, Q, R, lam, lam_index)
    return y if flat else y.reshape(*leading, out_features)
