"""``QRLoraLinear``: a drop-in replacement for ``nn.Linear`` with a QR-LoRA adapter.

    y = x W0^T + b + ((x R^T) * lam) Q^T          (W0, b, Q, R frozen; only lam trains)

State: ``weight`` and ``bias`` are frozen Parameters (so ``nn.Linear`` code that reads them keeps working);
``lam`` is the only trainable Parameter, shape (r,) or (num_adapters, r), initialised to 0 so that a converted
layer starts equal to the original; ``Q`` (out x r), ``R`` (r x in, W0's column order) and ``perm`` (the
pivots, int64, length in; ``perm[:r]`` are the basis columns) are buffers and travel with ``state_dict``.

Merging: ``merge()`` folds the update into ``weight`` (the forward is then a plain ``F.linear``), ``unmerge()``
subtracts it again (exact up to rounding). While merged, lam gets no gradient.

Half the basis memory: ``store_r=False`` keeps Q only (``R`` is then None). For a pivoted-QR basis the first r
rows of R are exactly Q^T W0 (in W0's column order), so the update is dW = Q diag(lam) Q^T W0, a scaled
projection in the output space: y = Y0 + b + ((Y0 Q) * lam) Q^T with Y0 = x W0^T. The forward and the backward
compute it that way (see ``functional`` and ``dispatch`` for what it costs); the outputs match a ``store_r=True``
layer to rounding. Such a layer undoes a merge by solving for W0 (``unmerge``), which is refused where
1 + lam is too close to 0 for that to be accurate.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .basis import ENERGY_RULES, QRLoraBasis, build_basis
from .dispatch import STRATEGIES
from . import functional
from .functional import BACKENDS, acc_dtype, implied_r, known_id_range, qrlora_linear, remember_id_range


def _same_weight(incoming: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether loading ``incoming`` leaves the layer's weight as it is: equal once copied into its dtype (a float32
    checkpoint onto the same base loaded in bfloat16 is the same weight; a bfloat16 one onto a float32 layer is not,
    it would round W0 away from the weight the basis was built from)."""
    if incoming.shape != own.shape or own.is_meta or hasattr(own, "device_mesh") or hasattr(incoming, "device_mesh") \
            or not (incoming.is_floating_point() and own.is_floating_point()):
        return incoming.shape == own.shape  # nothing cheap to compare by (meta, DTensor shards, a quantised weight)
    return torch.equal(incoming.to(own.device, own.dtype), own)


def _lam_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Half-precision lam cannot accumulate small optimizer steps; keep float32 master values for those.
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2 style: ``y = x W + b``, W stored in x out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def as_linear(module: nn.Module, caller: str = "as_linear") -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or for a ``Conv1D`` an ``nn.Linear`` holding W^T (a contiguous
    copy) and marked ``fan_in_fan_out = True``, so that merging gives a ``Conv1D`` back (PEFT's flag name).
    Anything else is a TypeError naming ``caller``."""
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise TypeError(f"{caller} expects an nn.Linear (or transformers' Conv1D), got {type(module).__name__}")
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    linear.fan_in_fan_out = True
    return linear


def _check_basis_values(Q: torch.Tensor, R: torch.Tensor | None, perm: torch.Tensor, in_features: int) -> None:
    """``from_basis``'s checks of the values (its shapes are checked already): distinct pivots in
    [0, in_features) (a permutation of range(in_features) when all are given), and a finite Q and R. Pivots
    that repeat or lie outside gave a layer whose ``perm`` was no permutation (longer than in_features, or with
    -1 in it), which save_adapter wrote and load_adapter then refused. Meta tensors have no values to check."""
    if not perm.is_meta and perm.numel():
        low, high = int(perm.min()), int(perm.max())
        if low < 0 or high >= in_features:
            bad = low if low < 0 else high
            raise ValueError(f"perm holds column index {bad}, outside [0, in_features) = [0, {in_features}): "
                             f"it must hold distinct column indices (a permutation of range({in_features}) when "
                             f"it has in_features entries)")
        if torch.unique(perm).numel() != perm.numel():
            values, counts = torch.unique(perm, return_counts=True)
            raise ValueError(f"perm repeats column index {int(values[counts > 1][0])}: it must hold distinct column "
                             f"indices (a permutation of range({in_features}) when it has in_features entries)")
    for name, t in (("Q", Q), ("R", R)):
        if t is not None and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the basis's {name} contains NaN or Inf; the layer's outputs would be NaN "
                             f"(rebuild the basis from a finite weight)")


def _in_recorded_function_forward() -> bool:
    """Whether this no_grad forward runs inside the forward of an autograd Function that the graph recorded, such
    as reentrant ``torch.utils.checkpoint`` (or DeepSpeed's), whose backward runs the forward again. Called under
    no_grad inside an adapter_batch / disable_adapters block only. A Function applied under no_grad (the
    checkpoints of a reference pass, which models that checkpoint in training mode still go through) records
    nothing: its ctx has no next functions. Every frame is looked at, so a checkpoint nested in a recorded one
    counts too."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount:
            ctx = frame.f_locals.get(code.co_varnames[0])
            if isinstance(ctx, torch.autograd.function.FunctionCtx) and getattr(ctx, "next_functions", True):
                return True
        frame = frame.f_back
    return False


class QRLoraLinear(nn.Module):
    """``nn.Linear`` plus a frozen pivoted-QR basis and trainable coefficients ``lam``.

    Build one with ``QRLoraLinear.from_linear(linear, tau=0.9)`` (or ``rank=``), or from a precomputed basis
    with ``QRLoraLinear.from_basis``. The constructor makes an empty layer of the given shape (e.g. to load a
    ``state_dict`` into). ``backend`` and ``strategy`` are passed to ``qrlora_linear`` (None: automatic).
    """

    # The basis buffers: a function of the base weight and the pivots (``perm``), so Hugging Face checkpoints skip
    # them (``skip_bases_in_hf_checkpoints``) and a state_dict may come without them (``_load_from_state_dict``).
    BASIS_BUFFERS = ("Q", "R")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 num_adapters: int = 1, tau: float | None = None, energy: str = "diag",
                 energy_captured: float | None = None, backend: str | None = None, strategy: str | None = None,
                 store_r: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank),
                            ("num_adapters", num_adapters)):
            # Any integer (numpy's too, as nn.Linear takes them), not a bool.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        in_features, out_features, rank, num_adapters = map(int, (in_features, out_features, rank, num_adapters))
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} exceeds min(in_features, out_features) = {min(in_features, out_features)}")
        if energy not in ENERGY_RULES:
            raise ValueError(f"energy must be one of {ENERGY_RULES}, got {energy!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if strategy is not None and strategy not in STRATEGIES + ("auto",):
            # Checked here, not first at the forward (qrlora_linear checks it again, with $QRLORA_STRATEGY).
            raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)} or None, got {strategy!r}")
        if not isinstance(store_r, bool):
            raise TypeError(f"store_r must be a bool, got {store_r!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.tau = None if tau is None else float(tau)  # (a numpy float would not go into adapter_config.json)
        self.energy = energy
        self.energy_captured = energy_captured
        self.backend = backend
        self.strategy = strategy
        self.merged = False
        self.adapters_disabled = False  # set by ``disable_adapters(model)``: the layer computes as its base
        self.fan_in_fan_out = False  # made from a transformers Conv1D: to_linear() gives a Conv1D back
        self.active_adapter = 0
        # Per-sequence or per-token ids used when forward() gets none (set by model-level context managers).
        self.adapter_ids: torch.Tensor | None = None
        # Set with them by ``adapter_batch`` and shared by every layer: whether the model is inside generate(), and
        # (for CUDA ids) the ids stretched for its beams and to one per token, made once for all layers.
        self.adapter_id_expansions: dict | None = None
        # The weight unmerge() made, and its version: W0 up to rounding only, which save_adapter warns about while
        # the layer still holds it unchanged (an adapter saved then is refused by the base model).
        self._unmerged_weight: tuple | None = None
        # A forward ran under adapter_batch / disable_adapters; see _refuse_recomputation_outside_context.
        self._context_pending = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.register_buffer("Q", torch.empty(out_features, rank, **factory))
        self.register_buffer("R", torch.empty(rank, in_features, **factory) if store_r else None)
        self.register_buffer("perm", torch.arange(in_features, device=device, dtype=torch.int64))
        lam_shape = (rank,) if num_adapters == 1 else (num_adapters, rank)
        self.lam = nn.Parameter(torch.zeros(lam_shape, device=device, dtype=_lam_dtype(self.weight.dtype)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As ``nn.Linear``'s: ``weight`` and ``bias`` drawn as it draws them, and an empty adapter: lam = 0 and
        the basis zero (Q = R = 0, perm the identity). The layer then computes ``F.linear`` until a basis is
        built (``from_linear``) or loaded (``load_state_dict``); a layer made by the constructor starts so, not
        with uninitialised memory (which could hold NaN, and 0 * NaN is NaN)."""
        if self.merged:
            raise ValueError("reset_parameters() on a merged layer; unmerge() first")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        for buffer in (self.Q, self.R):
            if buffer is not None:
                buffer.zero_()
        self.perm.copy_(torch.arange(self.in_features, device=self.perm.device))
        self.lam.zero_()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, tau: float | None = None, rank: int | None = None,
                    energy: str = "diag", num_adapters: int = 1, qr_method: str = "geqp3",
                    **kwargs) -> "QRLoraLinear":
        """Factorise ``linear.weight`` and keep the basis chosen by exactly one of ``tau`` or ``rank``.

        ``energy="diag"`` is the paper's rule (squared diagonal of R); ``"frobenius"`` stops the factorisation
        early at 1 - ||R22||_F^2/||W||_F^2 >= tau. ``qr_method`` picks the pivoting, "geqp3" (the paper's) or
        "randomized" (faster; see ``qrlora_kernels.basis``). The new layer shares ``linear``'s weight and bias
        storage. A transformers ``Conv1D`` (GPT-2) is taken too: the layer then holds its weight transposed
        (a copy) and ``to_linear()`` gives a ``Conv1D`` back. ``store_r=False`` keeps Q only (about half the
        basis memory; see the module docstring).
        """
        linear = as_linear(linear, "from_linear")
        basis = build_basis(linear.weight, tau=tau, rank=rank, energy=energy, method=qr_method)
        return cls.from_basis(linear, basis, tau=tau, energy=energy, num_adapters=num_adapters, **kwargs)

    @classmethod
    def from_basis(cls, linear: nn.Linear, basis: QRLoraBasis | tuple, *, tau: float | None = None,
                   energy: str = "diag", num_adapters: int = 1, **kwargs) -> "QRLoraLinear":
        """A layer over ``linear`` with a precomputed basis: a ``QRLoraBasis`` (from ``build_basis`` or
        ``truncate``) or a tuple ``(Q, R, perm)``, Q (out x r), R (r x in, original column order),
        perm the pivots (length in, or at least r: ``perm[:r]`` are the basis columns). With ``store_r=False``
        R is dropped (it must then equal Q^T W0, as a pivoted-QR basis's does; R may be None)."""
        taken = sorted({"in_features", "out_features", "rank", "bias", "device", "dtype"} & set(kwargs))
        if taken:
            raise TypeError(f"from_linear / from_basis take {', '.join(taken)} from the linear layer and the basis; "
                            f"convert the linear first (or the layer after, with .to(device, dtype))")
        linear = as_linear(linear, "from_basis")
        Q, R, perm = basis[0], basis[1], basis[2]
        energy_captured = basis.energy_captured if isinstance(basis, QRLoraBasis) else None
        out_features, in_features = linear.weight.shape
        if R is None and kwargs.get("store_r", True):
            raise ValueError("the basis has no R; pass store_r=False to build a layer that keeps Q only")
        r_shape = None if R is None else tuple(R.shape)
        if Q.dim() != 2 or Q.shape[0] != out_features or (R is not None and (
                R.dim() != 2 or R.shape[1] != in_features or Q.shape[1] != R.shape[0])):
            raise ValueError(f"basis shapes Q {tuple(Q.shape)}, R {r_shape} do not fit a linear layer of "
                             f"weight shape {tuple(linear.weight.shape)} (need Q (out, r) and R (r, in))")
        rank = Q.shape[1]
        if isinstance(perm, torch.Tensor) and (perm.is_floating_point() or perm.is_complex()
                                               or perm.dtype == torch.bool):
            raise TypeError(f"perm must hold integer column indices, got dtype {perm.dtype}")
        perm = torch.as_tensor(perm, dtype=torch.int64)
        if perm.dim() != 1 or not rank <= perm.numel() <= in_features:
            raise ValueError(f"perm must be 1-D with between rank={rank} and in_features={in_features} entries, "
                             f"got shape {tuple(perm.shape)}")
        _check_basis_values(Q, None if R is None or not kwargs.get("store_r", True) else R, perm, in_features)
        weight = linear.weight
        layer = cls(in_features, out_features, rank, bias=linear.bias is not None, num_adapters=num_adapters,
                    tau=tau, energy=energy, energy_captured=energy_captured, device="meta", dtype=weight.dtype,
                    **kwargs)
        # Share storage with the original layer: no copy of W0; merge() replaces rather than mutates it.
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer.Q = Q.detach().to(device=weight.device, dtype=weight.dtype).contiguous()
        if layer.R is not None:
            layer.R = R.detach().to(device=weight.device, dtype=weight.dtype).contiguous()
        full_perm = perm.to(weight.device)
        if full_perm.numel() < in_features:
            # Complete stored pivots to a permutation: the remaining columns, in their original order.
            rest = torch.ones(in_features, dtype=torch.bool, device=weight.device)
            rest[full_perm] = False
            full_perm = torch.cat([full_perm, rest.nonzero().flatten()])
        layer.perm = full_perm
        lam_shape = (rank,) if num_adapters == 1 else (num_adapters, rank)
        layer.lam = nn.Parameter(torch.zeros(lam_shape, device=weight.device, dtype=_lam_dtype(weight.dtype)))
        layer.fan_in_fan_out = bool(getattr(linear, "fan_in_fan_out", False))
        return layer

    # ------------------------------------------------------------------ adapters

    @property
    def held_basis_buffers(self) -> tuple[str, ...]:
        """The names of the basis buffers this layer holds: ``BASIS_BUFFERS``, less R when ``store_r=False``."""
        return tuple(name for name in self.BASIS_BUFFERS if getattr(self, name) is not None)

    @property
    def store_r(self) -> bool:
        """Whether the layer keeps R (False: Q only, R = Q^T W0; see the module docstring)."""
        return self.R is not None

    @property
    def num_adapters(self) -> int:
        return self.lam.shape[0] if self.lam.dim() == 2 else 1

    def add_adapter(self) -> int:
        """Append a zero row to lam for one more adapter (sharing Q and R); returns its index.

        lam stays the same Parameter with a new shape (its gradient is dropped): an optimizer built before keeps
        training it, but one that has already stepped holds state of the old shape and fails at its next step.
        Build the optimizer after adding adapters.
        """
        if self.merged:
            raise ValueError("cannot add an adapter to a merged layer; unmerge() first")
        rows = self.lam.detach().reshape(-1, self.rank)
        new = torch.cat([rows, rows.new_zeros(1, self.rank)])
        self._reshape_lam(new)
        return new.shape[0] - 1

    def _reshape_lam(self, values: torch.Tensor) -> None:
        # In place, so that whoever holds lam (an optimizer built before, a param-group list) sees the new rows
        # instead of silently keeping a Parameter the layer no longer uses.
        self.lam.data = values  # .data: autograd records nothing
        self.lam.grad = None

    def set_rows(self, rows: list[int]) -> None:
        """Keep the adapters in ``rows`` of lam, in that order (``delete_adapter``); one row gives back the (r,)
        shape. lam stays the same Parameter (see ``add_adapter``); the active adapter moves with its row (row 0 if
        it is not kept)."""
        if self.merged:
            raise ValueError("cannot change the adapters of a merged layer; unmerge() first")
        if not rows or any(isinstance(r, bool) or not isinstance(r, numbers.Integral)
                           or not 0 <= r < self.num_adapters for r in rows):
            raise ValueError(f"rows must be a non-empty list of rows of lam in [0, {self.num_adapters}), got {rows!r}")
        rows = [int(r) for r in rows]
        values = self.lam.detach().reshape(-1, self.rank)[rows]
        active = rows.index(self.active_adapter) if self.active_adapter in rows else 0
        self._reshape_lam(values.reshape(self.rank).clone() if len(rows) == 1 else values.clone())
        self.active_adapter = active

    def set_num_adapters(self, num_adapters: int) -> None:
        """Grow (zero rows) or shrink lam to ``num_adapters`` rows; 1 gives back the (r,) shape."""
        if isinstance(num_adapters, bool) or not isinstance(num_adapters, numbers.Integral) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        num_adapters = int(num_adapters)
        if self.merged:
            raise ValueError("cannot change the adapters of a merged layer; unmerge() first")
        rows = self.lam.detach().reshape(-1, self.rank)[:num_adapters]
        if rows.shape[0] < num_adapters:
            rows = torch.cat([rows, rows.new_zeros(num_adapters - rows.shape[0], self.rank)])
        new = rows.reshape(self.rank) if num_adapters == 1 else rows
        self._reshape_lam(new.clone())
        if self.active_adapter >= num_adapters:
            self.active_adapter = 0

    def _adapter_lam(self, adapter: int | None) -> torch.Tensor:
        # A bool (or a tensor) would index lam as a mask or a new axis, and fail later as a broadcasting error.
        if adapter is not None and (isinstance(adapter, bool) or not isinstance(adapter, numbers.Integral)):
            raise TypeError(f"adapter must be an adapter index (int) or None, got {type(adapter).__name__} "
                            f"{adapter!r}")
        if self.lam.dim() == 1:
            if adapter not in (None, 0):
                raise ValueError(f"adapter {adapter} is out of range: this layer has 1 adapter")
            return self.lam
        index = self.active_adapter if adapter is None else adapter
        if not 0 <= index < self.lam.shape[0]:
            raise ValueError(f"adapter {index} is out of range for {self.lam.shape[0]} adapters")
        return self.lam[index]

    # ------------------------------------------------------------------ forward

    def forward(self, input: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = input  # nn.Linear's name for it, so that layer(input=x) works as it does there
        if adapter_ids is None and not torch.compiler.is_compiling():
            self._refuse_recomputation_outside_context()
        ids = adapter_ids if adapter_ids is not None else self._context_adapter_ids(x)
        if self.merged or self.adapters_disabled:
            if ids is not None and not self.adapters_disabled:
                # Checked as in the unmerged layer (a merged one holds one adapter, id 0), not ignored: ids of
                # another adapter would get this one's update.
                functional._lam_index(ids, x, self.num_adapters)
            return F.linear(x, self.weight, self.bias)
        lam = self.lam if ids is not None else self._adapter_lam(None)
        return qrlora_linear(x, self.weight, self.bias, self.Q, self.R, lam, backend=self.backend,
                             adapter_ids=ids, strategy=self.strategy)

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``) or a pickle of the layer stands outside the ``adapter_batch`` /
        ``disable_adapters`` block it may be made in: it keeps none of the block's state (a copy made inside an
        ``adapter_batch`` kept routing every batch by the block's ids, one made inside ``disable_adapters``
        stayed disabled)."""
        state = super().__getstate__()
        state.update(adapter_ids=None, adapter_id_expansions=None, adapters_disabled=False, _context_pending=False)
        return state

    def _refuse_recomputation_outside_context(self) -> None:
        """Gradient checkpointing recomputes a layer during backward. If that backward runs after the
        ``adapter_batch`` (or ``disable_adapters``) block that set up the original forward, the recomputation
        would silently compute something else and the lam gradients would be wrong: refuse it. Backward inside
        the block, or no checkpointing, are exact. Any forward outside a block clears the mark (reentrant
        checkpointing runs its first forward under no_grad, so a no_grad forward may start a new graph). A
        forward in a block that records no graph (a reference pass under ``torch.no_grad()``, as for DPO or a KL
        term, before or after the policy's forward) is never recomputed, so it marks nothing. Not caught:
        another forward of the layer between the block and the checkpointed backward."""
        if self.adapter_ids is not None or self.adapters_disabled:
            if torch.is_grad_enabled() or _in_recorded_function_forward():
                self._context_pending = True
        elif self._context_pending:
            if torch._C._current_graph_task_id() != -1:  # running inside a backward pass: a recomputation
                raise RuntimeError(
                    "a QR-LoRA layer is being recomputed during backward (gradient checkpointing) after the "
                    "adapter_batch / disable_adapters block that set up its forward has ended: the recomputation "
                    "would compute something else and the lam gradients would be wrong. Call loss.backward() "
                    "inside the block")
            self._context_pending = False

    def _context_adapter_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ids set by ``adapter_batch``. Inside the model's ``generate`` (beams, ``num_return_sequences``:
        every sequence expanded into k consecutive rows, as PEFT's mixed-adapter generation assumes too), an
        input k times as long as the ids gets each id repeated k times. Ids passed to ``forward`` directly, and
        calls outside ``generate``, are never expanded."""
        ids, shared = self.adapter_ids, self.adapter_id_expansions
        if ids is None or shared is None or ids.dim() != 1 or x.dim() < 3:
            return ids
        compiling = torch.compiler.is_compiling()  # (then nothing is remembered: dynamo cannot trace it)
        n, rows = ids.shape[0], x.shape[0]
        if shared.get("generating") and n and rows != n and rows % n == 0:
            k = rows // n
            if compiling or not functional.id_range_kept(ids):  # made again each time: a write is always seen
                ids = ids[:, None].expand(n, k).reshape(-1)
            else:  # kept for the ids as they are now (a write bumps the version)
                ids = self._kept(shared, "beams", (id(ids), ids._version, k),
                                 lambda: ids[:, None].expand(n, k).reshape(-1), ids)
        if compiling or x.dim() != 3 or rows != ids.shape[0] or not functional.id_range_kept(ids):
            return ids  # as given: a mismatch is refused by the functional check
        # One id per token, made once per input shape for all the layers rather than by each of them.
        return self._kept(shared, "per_token", (id(ids), ids._version, tuple(x.shape[:-1])),
                          lambda: ids[:, None].expand(x.shape[:-1]).contiguous(), ids)

    @classmethod
    def _kept(cls, shared: dict, kind: str, key: tuple, make, ids: torch.Tensor) -> torch.Tensor:
        """``shared[kind][key]``, made by ``_derived_ids`` the first time; at most 8 kept per kind."""
        kept = shared.setdefault(kind, {})
        if key not in kept:
            if len(kept) >= 8:
                kept.clear()
            kept[key] = cls._derived_ids(ids, make)
        return kept[key]

    @staticmethod
    def _derived_ids(ids: torch.Tensor, make) -> torch.Tensor:
        """``make()``, ids rearranged, as an ordinary tensor (its range is checked once, not per layer) with the
        range of ``ids`` when that is known: the same values, which no layer then reads back. (Rearranged by
        expand, never repeat_interleave, which reads its repeats back from the device on some torch
        releases.)"""
        with torch.inference_mode(False):
            derived = make()
        known = known_id_range(ids)
        if known is not None:
            remember_id_range(derived, *known)
        return derived

    # ------------------------------------------------------------------ merging

    def _acc_dtype(self) -> torch.dtype:
        return acc_dtype(self.weight.dtype)

    @torch.no_grad()
    def basis_r(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R (r x in, W0's column order) in ``dtype`` (default: the weight's): the stored buffer, or for a
        ``store_r=False`` layer Q^T W0 formed now (in float32 at least; from a merged weight
        (I + Q diag(lam) Q^T) W0 by dividing row i by 1 + lam_i, refused where that is inaccurate)."""
        dtype = self.weight.dtype if dtype is None else dtype
        if self.R is not None:
            return self.R.to(dtype)
        acc = self._acc_dtype()
        r = implied_r(self.weight.detach(), self.Q, acc)
        if self.merged:
            self._check_merged_weight_is_invertible()
            r = r / (1 + self._adapter_lam(None).detach().to(acc)).unsqueeze(1)
        return r.to(dtype)

    def delta_weight(self, adapter: int | None = None) -> torch.Tensor:
        """dW = Q diag(lam) R (out x in) in the weight's dtype, accumulated in float32 at least."""
        lam = self._adapter_lam(adapter).detach()
        acc = self._acc_dtype()
        return ((self.Q.to(acc) * lam.to(acc)) @ self.basis_r(acc)).to(self.weight.dtype)

    def _merged_weight(self, sign: float, lam: torch.Tensor | None = None) -> torch.Tensor:
        lam = (self._adapter_lam(None) if lam is None else lam).detach() * sign
        if (self.weight.device.type == "cuda" and self.backend != "torch"
                and functional.triton_dot_takes(self.weight.dtype)):
            from . import ops
            return ops.merged_weight(self.weight.detach(), self.Q, self.basis_r(), lam)
        acc = self._acc_dtype()
        w = self.weight.detach().to(acc) + (self.Q.to(acc) * lam.to(acc)) @ self.basis_r(acc)
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold dW into ``weight``; the forward becomes a plain ``F.linear``. Single adapter only."""
        if self.merged:
            raise ValueError("layer is already merged")
        if self.num_adapters > 1:
            raise ValueError(f"merge() needs a single adapter, but this layer holds {self.num_adapters}; "
                             "use to_linear() per adapter or set_num_adapters(1)")
        # A new tensor rather than an in-place update: the weight may share storage with the original nn.Linear.
        # Made outside inference mode (a merge for serving may run inside it), so that the layer can still train.
        with torch.inference_mode(False):
            self.weight = nn.Parameter(self._merged_weight(1.0), requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW from ``weight`` again (exact up to rounding)."""
        if not self.merged:
            raise ValueError("layer is not merged")
        # basis_r refuses (before anything changes) where a store_r=False layer cannot recover W0 accurately.
        with torch.inference_mode(False):
            self.weight = nn.Parameter(self._merged_weight(-1.0), requires_grad=False)
            self._unmerged_weight = (id(self.weight), self.weight._version)  # (ints: the layer pickles)
        self.merged = False

    def holds_unmerged_weight(self) -> bool:
        """Whether the weight is still the one ``unmerge()`` made (W0 up to rounding), unchanged."""
        made = getattr(self, "_unmerged_weight", None)
        if made is None or self.weight.is_inference():  # (unmerge() never makes an inference tensor)
            return False
        return made == (id(self.weight), self.weight._version)

    # A merged store_r=False layer recovers W0 (unmerge) or R (basis_r) through (I + Q diag(lam) Q^T)^-1, which
    # scales the merged weight's rounding by 1 / |1 + lam_i| along Q's columns: refused beyond this factor (any lam
    # outside [-1.1, -0.9] passes).
    MAX_UNMERGE_AMPLIFICATION = 10.0

    def _check_merged_weight_is_invertible(self) -> None:
        lam = self._adapter_lam(None).detach().double()
        amplification = (1 / (1 + lam).abs()).max().item()
        if not amplification <= self.MAX_UNMERGE_AMPLIFICATION:
            i = int((1 + lam).abs().argmin())
            raise ValueError(
                f"cannot recover W0 from this merged store_r=False layer accurately: lam[{i}] = {lam[i].item():.6g}, "
                f"so 1 + lam is {(1 + lam[i]).item():.3g} and its rounding would grow by a factor of "
                f"{amplification:.3g} (the merge all but removed that direction of W0). Reload the base weights and "
                f"the adapter instead (save_adapter before merging), or build layers with store_r=True when they "
                f"must be unmerged")

    @torch.no_grad()
    def to_linear(self, adapter: int | None = None) -> nn.Module:
        """A plain ``nn.Linear`` with the adapter folded in (copies; this layer is unchanged).

        Its parameters stay as frozen as this layer's ``weight`` and ``bias`` (as after PEFT's ``merge_and_unload``).
        A layer made from a transformers ``Conv1D`` gives a ``Conv1D`` back (weight in x out, as GPT-2 stores it).
        """
        if self.merged:
            self._adapter_lam(adapter)  # the merged adapter is the only one: another index is refused
        weight = self.weight.detach().clone() if self.merged else (
            self.weight.detach() + self.delta_weight(adapter)).to(self.weight.dtype)
        if self.fan_in_fan_out:
            return self._to_conv1d(weight)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.copy_(self.bias.detach())
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    @torch.no_grad()
    def base_layer(self) -> nn.Module:
        """The layer this one adapts, without its update: an ``nn.Linear`` holding W0 and the bias (the same
        tensors, not copies, unless the layer is merged: W0 is then recovered as ``unmerge()`` would), or for a
        layer made from a transformers ``Conv1D`` a ``Conv1D`` (a copy, W0 transposed). This layer is unchanged."""
        weight = self._merged_weight(-1.0) if self.merged else self.weight.detach()
        if self.fan_in_fan_out:
            return self._to_conv1d(weight)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=self.bias.requires_grad)
        return linear

    def _to_conv1d(self, weight: torch.Tensor) -> nn.Module:
        from transformers.pytorch_utils import Conv1D
        conv = Conv1D(self.out_features, self.in_features)
        conv.weight = nn.Parameter(weight.t().contiguous(), requires_grad=self.weight.requires_grad)
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features, dtype=weight.dtype,
                                                                   device=weight.device)
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias is not None and self.bias.requires_grad)
        return conv

    # A merged layer's state_dict says so (its weight is W0 + dW, not W0); an unmerged layer's has no such key, as
    # before it existed. Loading sets the layer's state from it, so the weight and the forward agree.
    MERGED_KEY = "merged"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self.MERGED_KEY] = torch.ones((), dtype=torch.bool, device=self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged_key, weight_key, lam_key = prefix + self.MERGED_KEY, prefix + "weight", prefix + "lam"
        lam = state_dict.get(lam_key)
        if isinstance(lam, torch.Tensor) and lam.dtype in (torch.float16, torch.bfloat16):
            # lam keeps float32 in half-precision models; a copy casts, but load_state_dict(..., assign=True) would
            # install a bf16 state_dict's tensor itself. (The dict is load_state_dict's own copy.)
            state_dict[lam_key] = lam.to(torch.float32)
        merged = bool(state_dict[merged_key]) if merged_key in state_dict else False
        name = prefix.rstrip(".") or type(self).__name__
        if weight_key not in state_dict and (lam_key in state_dict or merged_key in state_dict):
            # Without a weight the layer keeps its own, and with it its merged state: a merged layer's weight
            # holds the dW of its lam, so that lam must not change (nor a merged one arrive at an unmerged layer).
            lam = state_dict.get(lam_key)
            problem = None
            if merged != self.merged:
                problem = (f"the layer is {'merged' if self.merged else 'not merged'} and the state_dict comes from "
                           f"a {'merged' if merged else 'not merged'} one")
            elif self.merged and isinstance(lam, torch.Tensor) and (lam.shape != self.lam.shape or not torch.equal(
                    lam.to(self.lam.device, self.lam.dtype), self.lam.detach())):
                problem = "the layer is merged and the state_dict holds another lam"
            if problem:
                error_msgs.append(f"{name}: {problem}, without a weight to match (a merged layer's weight holds the "
                                  f"update of its lam): {'unmerge()' if self.merged else 'merge()'} the layer first")
                return
        errors_before = len(error_msgs)
        # A plain nn.Linear's state_dict (a non-strict load: "convert, then load the pretrained weights") replaces
        # W0 under a basis built from another weight: said, not refused (the layer still computes W + dW).
        weight = state_dict.get(weight_key)
        stale_basis = (isinstance(weight, torch.Tensor) and not self.merged
                       and not any(prefix + key in state_dict for key in ("lam", "perm") + self.held_basis_buffers)
                       and not self.Q.is_meta and bool(self.Q.any()) and not _same_weight(weight, self.weight))
        self._load_basis_and_weights(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                     error_msgs)
        if stale_basis and len(error_msgs) == errors_before:
            warnings.warn(f"{name}: load_state_dict replaced the weight W0 but not the QR-LoRA basis, which was built "
                          f"from the weight before: the update no longer comes from a pivoted QR of W0. Load the "
                          f"weights before converting (QRLoraLinear.from_linear, apply_qrlora), or load a state_dict "
                          f"with the basis", UserWarning, stacklevel=3)
        if merged_key in unexpected_keys:
            unexpected_keys.remove(merged_key)
        if weight_key in state_dict and len(error_msgs) == errors_before:
            self.merged = merged

    @torch.no_grad()
    def _state_weight_problem(self, state_dict, prefix: str, weight: torch.Tensor) -> str | None:
        """Why a basis-less state_dict's weight is not this layer's (merged as the state_dict says), or None.

        Unmerged: its weight must be this layer's W0 once copied into its dtype. Merged: W0 + dW of its lam, formed
        elsewhere (another GEMM order, a Triton config picked by the autotuner, another dtype), so it is compared
        in float64 with the rounding that forming it allows, which a different base weight exceeds."""
        differs = "its weight differs from this layer's, from which the layer's basis was built"
        if prefix + self.MERGED_KEY not in state_dict:
            if self.merged:
                return "this layer is merged (its weight holds its own update): unmerge() it first"
            return None if _same_weight(weight, self.weight) else differs
        lam = state_dict.get(prefix + "lam")
        if self.merged:
            return "this layer is merged already: unmerge() it first"
        if not isinstance(lam, torch.Tensor) or lam.shape != self.lam.shape:
            return None  # torch's own size-mismatch error names lam
        if weight.shape != self.weight.shape or self.weight.is_meta or not weight.is_floating_point():
            return None if weight.shape == self.weight.shape else differs
        f64 = torch.float64
        Q, R = self.Q.to(f64), self.basis_r(f64)
        lam = lam.to(self.weight.device, f64)
        got, w0 = weight.to(self.weight.device, f64), self.weight.to(f64)
        # The weights' roundings, and dW's: the basis held in its dtype, summed over r terms in the accumulator's.
        rounding = max(torch.finfo(weight.dtype).eps, torch.finfo(self.weight.dtype).eps)
        update = torch.finfo(self.Q.dtype).eps + torch.finfo(acc_dtype(self.weight.dtype)).eps * self.rank
        tolerance = 2 * rounding * (got.abs() + w0.abs()) + 2 * update * ((Q.abs() * lam.abs()) @ R.abs())
        if bool(((got - w0 - (Q * lam) @ R).abs() <= tolerance).all()):
            return None
        return "its weight is not this layer's W0 merged with its lam (another base weight)"

    def _load_basis_and_weights(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                error_msgs):
        # A state_dict without the basis (a Hugging Face checkpoint: see skip_bases_in_hf_checkpoints) keeps this
        # layer's Q and R, so its lam fits only if it was trained on the same basis: the same leading pivots. When
        # they are, the basis is not missing (a strict load passes); when they are not, the load is refused.
        perm = state_dict.get(prefix + "perm")
        basis_keys = [prefix + name for name in self.held_basis_buffers]
        without_basis = (isinstance(perm, torch.Tensor) and not all(k in state_dict for k in basis_keys)
                         and not self.perm.is_meta)
        if without_basis:
            r, weight = self.rank, state_dict.get(prefix + "weight")
            problem = None
            if perm.shape != self.perm.shape or not torch.equal(perm[:r].to(self.perm.device), self.perm[:r]):
                problem = f"its pivots perm[:{r}] differ from this layer's, so its lam belongs to another basis"
            elif isinstance(weight, torch.Tensor):
                problem = self._state_weight_problem(state_dict, prefix, weight)
            if problem:
                absent = [k[len(prefix):] for k in basis_keys if k not in state_dict]
                why = ("it comes from a layer built with store_r=False, which keeps Q only" if absent == ["R"] else
                       "Hugging Face checkpoints leave the basis out")
                error_msgs.append(
                    f"{prefix.rstrip('.') or type(self).__name__}: the state_dict has no {', '.join(absent)} ({why}) "
                    f"and {problem}; build the layer from the base weights the checkpoint was trained on (with the "
                    f"same QR-LoRA config, on the same kind of device), or load a state_dict that includes "
                    f"{' and '.join(absent)}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if without_basis:
            for key in basis_keys:
                if key not in state_dict and key in missing_keys:
                    missing_keys.remove(key)

    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16() and .to(torch.float16) cast every floating parameter: lam keeps float32 master values
        # under a half-precision weight, as from_linear gives them (half-precision lam loses small optimizer steps),
        # taken from the values before the cast where they are real (not a meta tensor's).
        # (detached: _apply may swap the parameter's and its grad's data in place)
        before = self.lam.detach()
        grad_before = None if self.lam.grad is None else self.lam.grad.detach()
        result = super()._apply(fn, recurse)
        lam = self.lam
        if lam.dtype in (torch.float16, torch.bfloat16) and _lam_dtype(self.weight.dtype) == torch.float32:
            # From float32 or float64 values (a .double() layer cast down), not their half-precision rounding.
            def wide(old, new):
                real = old is not None and old.dtype in (torch.float32, torch.float64) and not old.is_meta
                return old.to(new.device, torch.float32) if real and not new.is_meta else new.float()
            lam.data = wide(before, lam.data)
            if lam.grad is not None:
                lam.grad = wide(grad_before, lam.grad)
        return result

    def extra_repr(self) -> str:
        tau = "None" if self.tau is None else f"{self.tau:g}"
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"rank={self.rank}", f"tau={tau}", f"energy={self.energy!r}"]
        if self.energy_captured is not None and math.isfinite(self.energy_captured):
            parts.append(f"energy_captured={self.energy_captured:.4f}")
        if self.num_adapters > 1:
            parts.append(f"num_adapters={self.num_adapters}")
        if not self.store_r:
            parts.append("store_r=False")
        if self.merged:
            parts.append("merged=True")
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        return ", ".join(parts)
