"""Model-level QR-LoRA: find targeted ``nn.Linear`` modules, replace them, freeze the rest.

``apply_qrlora(model, config)`` is PEFT's ``get_peft_model`` for QR-LoRA, but in place: the
model keeps its class, so ``transformers`` code paths (generation, ``save_pretrained``, ``Trainer``)
keep working; ``save_pretrained`` leaves out the bases (``skip_bases_in_hf_checkpoints``). The adapter's
bookkeeping lives in three attributes of the root module:

* ``model.qrlora_config``         -- the ``QRLoraConfig`` used;
* ``model.qrlora_adapter_ids``    -- adapter name -> row of every layer's ``lam`` (``{"default": 0}``);
* ``model.qrlora_modules_to_save`` -- the ``modules_to_save``: a ``ModuleCopies`` holding each adapter's copy
  (``.names()``; see ``modules_to_save.py``).

``adapter_batch(model, ids)`` routes a multi-adapter batch through any model's ``forward``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .basis import QRLoraBasis, build_bases
from .config import ALL_LINEAR, SEQ_CLS_HEADS, TASK_HEADS, QRLoraConfig
from . import distributed as _dist
from .functional import read_id_range, remember_id_range
from .instance_override import InstanceOverride
from .modules_to_save import BASE, ModuleCopies, routed, tied_outside
from .reentrant_checkpointing import keep_gradients_through_reentrant_checkpoints

ADAPTER_IDS_ATTR = "qrlora_adapter_ids"
CONFIG_ATTR = "qrlora_config"
MODULES_TO_SAVE_ATTR = "qrlora_modules_to_save"
ACTIVE_ADAPTER_ATTR = "qrlora_active_adapter"
# Per adapter that load_adapter loaded: its file's config and modules (rank, tau, energy), so that saving it again
# writes that adapter, not the ranks and modules of the layers it shares with others (see adapter_io.save_adapter).
ADAPTER_FILES_ATTR = "qrlora_adapter_files"
DEFAULT_ADAPTER = "default"
_SKIPPED_ON_SAVE_ATTR = "_qrlora_keys_skipped_on_save"
_COMPILED_ATTR = "_orig_mod"  # where torch.compile's OptimizedModule holds the module it wraps


def _layer_class():
    from .layer import QRLoraLinear  # lazy: keeps ``import qrlora_kernels.config`` light
    return QRLoraLinear


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2), which computes the same with W stored transposed."""
    from .layer import is_conv1d
    return isinstance(module, nn.Linear) or is_conv1d(module)


# ---------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class ModuleReport:
    name: str
    out_features: int
    in_features: int
    rank: int
    energy_captured: float
    params: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclasses.dataclass
class QRLoraReport:
    """What ``apply_qrlora`` did: per adapted module, and totals."""

    modules: list[ModuleReport]
    skipped: list[str]              # targeted but left as nn.Linear: no component within ``budget``, or a zero weight
    modules_to_save: list[str]
    adapter_params: int             # sum of ranks: the trainable lam scalars
    modules_to_save_params: int
    trainable_params: int
    total_params: int
    # Values held in the layers' basis buffers (Q and R; Q alone with store_r=False), in the weights' dtype: the
    # memory QR-LoRA adds to the model (frozen, not parameters, and left out of Hugging Face checkpoints).
    basis_values: int = 0

    def __getattr__(self, name: str):
        # Only reached for a missing attribute. PEFT's habit, model = get_peft_model(model, config), written as
        # model = apply_qrlora(model, config), hands this report to Trainer or to the training loop: say so.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"'QRLoraReport' object has no attribute {name!r}: apply_qrlora converts the model in "
                             f"place and returns this report of what it did, not a model (unlike PEFT's "
                             f"get_peft_model); keep using the model you passed to it")

    def __call__(self, *args, **kwargs):
        # The same habit, then calling "the model": model(input_ids) would say only "not callable".
        raise TypeError("a QRLoraReport is not callable: apply_qrlora converts the model in place and returns this "
                        "report of what it did, not a model (unlike PEFT's get_peft_model); call the model you passed "
                        "to it")

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["trainable_percent"] = self.trainable_percent
        return out

    def __str__(self) -> str:
        header = ("module", "shape", "rank", "energy", "params")
        rows = [(m.name, f"{m.out_features}x{m.in_features}", str(m.rank), f"{m.energy_captured:.4f}", str(m.params))
                for m in self.modules]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if self.skipped:
            lines.append(f"left as nn.Linear (no component within the budget, or an all-zero weight): "
                         f"{len(self.skipped)} modules")
        if self.modules_to_save:
            lines.append(f"modules_to_save: {', '.join(self.modules_to_save)} ({self.modules_to_save_params:,} params)")
        lines.append(f"adapted modules: {len(self.modules)} | QR-LoRA params: {self.adapter_params:,} | "
                     f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
                     f"trainable%: {self.trainable_percent:.4f}")
        if self.basis_values:
            share = 100.0 * self.basis_values / self.total_params if self.total_params else 0.0
            lines.append(f"basis buffers: {self.basis_values:,} values (+{share:.1f}% of all params in memory)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- selection
def output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """A transformers model's LM head (``get_output_embeddings()``), or None."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        head = get_out()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _output_head_names(model: nn.Module) -> set[str]:
    """Linear modules that ``"all-linear"`` leaves alone: the LM head and classification heads."""
    heads: list[nn.Module] = []
    emb = output_embeddings(model)
    if emb is not None:
        heads.append(emb)
    for attr in SEQ_CLS_HEADS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            heads.append(head)
    excluded: set[str] = set()
    for name, module in model.named_modules():
        if any(module is h for h in heads):
            excluded.add(name)
            excluded.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return excluded


def _read_by_parent(model: nn.Module) -> set[str]:
    """Linear modules whose parent reads their weight directly and never calls their ``forward``.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``: an adapter
    there would never see an input, and its lam would never train (PEFT warns about the same trap).
    """
    return {f"{name}.out_proj" if name else "out_proj"
            for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}


def find_targets(model: nn.Module, config: QRLoraConfig) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs ``config`` targets, in ``named_modules`` order: ``nn.Linear`` modules, and
    transformers' ``Conv1D`` (GPT-2's projections; ``out_in_weight`` gives its weight as out x in)."""
    all_linear = config.target_modules == ALL_LINEAR
    excluded = _output_head_names(model) if all_linear else set()
    saved_prefixes = [name for name, _ in model.named_modules() if name and config.is_module_to_save(name)]
    unreachable = _read_by_parent(model)
    QRLoraLinear = _layer_class()
    targets = []
    for name, module in model.named_modules():
        if not name or type(module) is QRLoraLinear or not _is_linear(module):
            continue
        # A module trained in full (modules_to_save) needs no adapter inside it.
        if any(name == p or name.startswith(p + ".") for p in saved_prefixes):
            continue
        if config.is_target(name, all_linear_excluded=excluded):
            if name in unreachable:
                if all_linear:
                    continue
                raise ValueError(f"{name} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                                 f"directly and never calls its forward: an adapter there would never train. "
                                 f"Leave it out of target_modules (or use exclude_modules)")
            targets.append((name, module))
    return targets


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """A target's weight as out x in: ``nn.Linear``'s own, a ``Conv1D``'s transposed (a view, not a copy: the
    copy each converted layer keeps is made one layer at a time, when it replaces the Conv1D)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _no_target_message(model: nn.Module, config: QRLoraConfig) -> str:
    """Why nothing matched: modules that matched by name but are not ``nn.Linear`` are named with their type."""
    message = (f"no nn.Linear module matched target_modules={config.target_modules!r}"
               f" (exclude_modules={config.exclude_modules!r}, layers={config.layers!r})")
    other = [(n, type(m).__name__) for n, m in model.named_modules()
             if n and not _is_linear(m) and config.target_modules != ALL_LINEAR and config.is_target(n)]
    if other:
        kinds = sorted({k for _, k in other})
        message += (f"; matched by name but not nn.Linear: {[n for n, _ in other[:4]]} ({', '.join(kinds)})."
                    f" QR-LoRA adapts nn.Linear layers (and transformers' Conv1D) only")
    linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
    return message + f"; the model's linear modules include {linear_names[:8]}"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def refuse_bare_layer(model: nn.Module, caller: str) -> None:
    """Model-level functions replace a model's linear submodules: a bare layer (the model itself an nn.Linear,
    Conv1D or QRLoraLinear) has none, and would get a child named '' instead. Refused, naming what works."""
    from .layer import is_conv1d
    if isinstance(model, (nn.Linear, _layer_class())) or is_conv1d(model):
        raise TypeError(f"{caller} works on a model that holds linear layers, not on a {type(model).__name__} "
                        f"itself: wrap the layer (nn.Sequential(layer)), or use QRLoraLinear's own methods "
                        f"(from_linear, merge, to_linear, state_dict)")


def qrlora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    QRLoraLinear = _layer_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QRLoraLinear)]


def saved_key_variants(keys: Iterable[str]) -> set[str]:
    """``keys`` as a model's ``state_dict`` names them, and as the ``torch.compile`` wrapper's does (with the
    ``_orig_mod.`` prefix): ``Trainer`` handed a compiled model saves and loads the wrapper's ``state_dict``."""
    keys = set(keys)
    return keys | {f"{_COMPILED_ATTR}.{key}" for key in keys}


def skip_bases_in_hf_checkpoints(model: nn.Module) -> None:
    """Make Hugging Face ``save_pretrained``, and so ``Trainer``'s checkpoints, leave out every layer's Q and R.

    They are as large as the adapted weights themselves at tau = 0.9, and whoever can use such a checkpoint rebuilds
    them anyway (``apply_qrlora`` on the base model, then the checkpoint's ``lam`` and ``perm``; a ``perm`` that does
    not match the rebuilt basis is refused at load, see ``QRLoraLinear._load_from_state_dict``). Each
    ``PreTrainedModel`` in ``model`` gets its own layers' keys in ``_keys_to_ignore_on_save`` (transformers' list of
    keys ``save_pretrained`` drops; ``Trainer`` reads it too when it resumes); keys added here before are taken back
    first, so this is called after every change of the model's layers. Keys are listed in both
    ``saved_key_variants``. Each also gets ``frozen_weights.install_hooks``' hooks, for checkpoints that
    ``QRLoraCheckpointCallback`` wrote without the frozen weights.
    """
    transformers = sys.modules.get("transformers")  # no transformers imported: no PreTrainedModel to mark
    pretrained = getattr(transformers, "PreTrainedModel", None)
    if pretrained is None:
        return
    from .frozen_weights import install_hooks
    QRLoraLinear = _layer_class()
    for owner in model.modules():
        if not isinstance(owner, pretrained):
            continue
        ours = saved_key_variants(f"{name}.{buffer}" for name, module in owner.named_modules()
                                  if isinstance(module, QRLoraLinear) for buffer in module.held_basis_buffers)
        theirs = set(owner._keys_to_ignore_on_save or ()) - getattr(owner, _SKIPPED_ON_SAVE_ATTR, set())
        owner._keys_to_ignore_on_save = theirs | ours
        setattr(owner, _SKIPPED_ON_SAVE_ATTR, ours)
        install_hooks(owner)


# ---------------------------------------------------------------------------------------- bases
def _factorise_many(weights: Sequence[torch.Tensor], config: QRLoraConfig, names: Sequence[str],
                    on_done=None) -> list[QRLoraBasis]:
    """The bases of ``weights`` under ``config``; same-shape weights are factorised as one batch."""
    with torch.no_grad():
        if config.budget is not None:
            # The budget competes over every component, so each module needs its full diagonal.
            # tau=1 with the diag rule: the full factorisation, energies normalised by sum_j R_jj^2.
            # Deferred: no Q is formed until the budget has chosen the ranks (see DeferredBasis).
            return build_bases(weights, tau=1.0, energy="diag", names=names, on_done=on_done, defer=True)
        return build_bases(weights, tau=None if config.rank is not None else config.tau, rank=config.rank,
                           energy=config.energy, names=names, on_done=on_done, method=config.qr_method,
                           keep_r=config.store_r)


def _budget_ranks(diag_energies: Sequence[torch.Tensor], budget: int) -> list[int]:
    """Per module, how many of the ``budget`` globally largest normalised energies it owns.

    Each module's energies are non-increasing, so the winners of every module are a prefix:
    the count is that module's rank. Ties are broken by module order, then component order.
    """
    sizes = [int(d.numel()) for d in diag_energies]
    total = sum(sizes)
    if budget > total:
        raise ValueError(f"budget={budget} exceeds the {total} components available in the "
                         f"{len(sizes)} targeted modules")
    flat = torch.cat([d.detach().to("cpu", torch.float64).reshape(-1) for d in diag_energies])
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    # A stable descending sort makes the selection deterministic (identical on every rank).
    order = torch.sort(flat, descending=True, stable=True).indices[:budget]
    counts = torch.bincount(owner[order], minlength=len(sizes))
    return [int(c) for c in counts]


def _make_layer(linear: nn.Module, basis: QRLoraBasis, config: QRLoraConfig, num_adapters: int = 1) -> nn.Module:
    QRLoraLinear = _layer_class()
    return QRLoraLinear.from_basis(linear, basis, tau=config.tau, energy=config.energy, num_adapters=num_adapters,
                                   store_r=config.store_r)


def _plan_conversion(model: nn.Module, config: QRLoraConfig, adapter_name: str):
    """apply_qrlora's checks and choices before any factorisation: (targets, all-zero names, modules_to_save)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    refuse_bare_layer(unwrap_model(model), "apply_qrlora")
    if not isinstance(config, QRLoraConfig):
        raise TypeError(f"config must be a QRLoraConfig, got {type(config).__name__}")
    if qrlora_layers(model):
        raise ValueError("this model already has QR-LoRA layers; to add another adapter use "
                         "load_adapter(model, path, adapter_name=...), or merge_and_unload(model) first")
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(_no_target_message(model, config))
    for name, linear in targets:
        _refuse_unloaded_weight(name, linear)
    # An all-zero weight (a zero-initialised projection) has no basis: it stays an nn.Linear, like a module
    # the budget gives nothing, instead of failing the whole conversion.
    zero = [name for name, linear in targets if not bool(linear.weight.detach().any())]
    if zero:
        if len(zero) == len(targets):
            raise ValueError(f"every targeted weight is all zeros ({', '.join(zero[:4])}): no basis to build")
        warnings.warn(f"{len(zero)} targeted weight(s) are all zeros and stay nn.Linear (no basis to build): "
                      f"{', '.join(zero[:4])}{', ...' if len(zero) > 4 else ''}", UserWarning, stacklevel=3)
        targets = [(name, linear) for name, linear in targets if name not in set(zero)]
    if config.modules_to_save and not any(n and config.is_listed_to_save(n) for n, _ in model.named_modules()):
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of the model")
    saved = [n for n, _ in model.named_modules() if n and config.is_module_to_save(n)]
    # Keep only the outermost matches, so nested ones are not counted twice.
    saved = [n for n in saved if not any(n.startswith(p + ".") for p in saved if p != n)]
    return targets, zero, saved


def _agreement_items(config: QRLoraConfig, targets) -> dict[str, bytes]:
    """What every rank of a process group must agree on: the config and each targeted module (its name, and its
    weight's shape, dtype and a hash of a sample of its values). Lists in the config count as sets (the order of
    target_modules does not change what is adapted; a list made from a set differs between processes)."""
    from .adapter_io import sample_hash

    def canonical(value):
        if isinstance(value, (list, tuple, set, frozenset)):
            return sorted(map(str, value))
        return value
    config_items = {key: canonical(value) for key, value in config.to_dict().items()}
    items = {"the config": json.dumps(config_items, sort_keys=True, default=str).encode()}
    for i, (name, module) in enumerate(targets):
        weight = out_in_weight(module)
        items[f"targeted module {i} ({name}: its name, or its weight's shape, dtype or values)"] = \
            f"{name} {tuple(weight.shape)} {weight.dtype} {sample_hash(weight)}".encode()
    return items


# ---------------------------------------------------------------------------------------- public API
def apply_qrlora(model: nn.Module, config: QRLoraConfig, *, progress: Optional[bool] = None,
                 group=None, adapter_name: str = DEFAULT_ADAPTER) -> QRLoraReport:
    """Replace every ``nn.Linear`` that ``config`` targets by a ``QRLoraLinear``, in place.

    Every other parameter is frozen, except those of ``config.modules_to_save``. The
    factorisations run on the weights' devices, and weights that share a shape (the same
    projection in every layer) are factorised as one batch (``qrcp_batched``). Inside an initialised
    ``torch.distributed`` process group (``group``, default the world) the factorisations are split across the
    ranks and the bases broadcast, so every rank ends with the same model as one process would.

    ``progress``: show a tqdm bar over modules (None: only on a terminal). ``adapter_name``: the name of the
    adapter being trained (PEFT's ``get_peft_model(..., adapter_name=)``), which ``save_adapter`` records.
    Returns a ``QRLoraReport`` (``print(report)`` gives a table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_qrlora needs an nn.Module, got {type(model).__name__}")
    # Every rank must fail together (a rank that raised alone would leave the others waiting in a collective) and
    # agree on the model and config (else bases mixed from different weights, or a collective that never returns).
    error = targets = items = device = None
    distributed = _dist.world_info(group)[1] > 1
    try:
        targets, zero, saved = _plan_conversion(model, config, adapter_name)
        device = out_in_weight(targets[0][1]).device
        items = _agreement_items(config, targets) if distributed else None
    except Exception as err:  # noqa: BLE001 -- re-raised below, on this rank; the others raise naming it
        error = err
    _dist.raise_together(error, group, device=device)
    if distributed:
        _dist.check_same_on_every_rank(items, group, device=device)

    bases = _dist.compute_bases([out_in_weight(module) for _, module in targets],
                                lambda ws, names, on_done: _factorise_many(ws, config, names, on_done),
                                names=[name for name, _ in targets], progress=progress, group=group,
                                ranks_fn=(lambda diags: _budget_ranks(diags, config.budget))
                                if config.budget is not None else None, with_r=config.store_r)

    for p in model.parameters():
        p.requires_grad_(False)
    reports, skipped, recorded = [], [], {}
    for (name, linear), basis in zip(targets, bases):
        if basis is None or basis.rank == 0:
            skipped.append(name)
            continue
        layer = _make_layer(linear, basis, config)
        _set_submodule(model, name, layer)
        recorded[canonical_name(name)] = {"rank": basis.rank, "tau": layer.tau, "energy": layer.energy,
                                          "energy_captured": basis.energy_captured}
        reports.append(ModuleReport(name, layer.out_features, layer.in_features, basis.rank,
                                    basis.energy_captured, basis.rank))
    copies = ModuleCopies()
    for name in saved:  # trained from the base values, which are kept (disable_adapters, adapters without them)
        copies.train_in_place(model, canonical_name(name), adapter_name)
    saved_params = sum(p.numel() for name in saved for p in model.get_submodule(name).parameters())
    _warn_if_a_fresh_head_stays_frozen(model, config, saved)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, ADAPTER_IDS_ATTR, {adapter_name: 0})
    setattr(model, MODULES_TO_SAVE_ATTR, copies)
    # Its modules and ranks, as load_adapter records an adapter's: save_adapter then keeps to them when adapters
    # loaded later added layers (or rows) that this adapter does not use.
    setattr(model, ADAPTER_FILES_ATTR, {adapter_name: {"config": config, "modules": recorded}})
    skip_bases_in_hf_checkpoints(model)
    keep_gradients_through_reentrant_checkpoints(model, adapted=bool(qrlora_layers(model)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    skipped = sorted(skipped + zero, key=order.__getitem__)
    basis_values = sum(getattr(layer, key).numel() for _, layer in qrlora_layers(model)
                       for key in layer.held_basis_buffers)
    return QRLoraReport(reports, skipped, saved, sum(m.rank for m in reports), saved_params, trainable, total,
                        basis_values)


def _refuse_unloaded_weight(name: str, module: nn.Module) -> None:
    """A weight on the meta device, or a quantised one, has no float values to factorise or fingerprint: say so,
    naming the module, before anything changes."""
    weight = module.weight
    if weight.is_meta:
        raise ValueError(f"{name}: its weight is on the meta device, not loaded (a model made under "
                         f"init_empty_weights, or a device_map that offloads it); QR-LoRA factorises the weight "
                         f"itself: load the weights onto a device first")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: its weight is {weight.dtype} of shape {tuple(weight.shape)}, a quantised layer "
                        f"({type(module).__name__}); QR-LoRA factorises the weight itself: load the base model "
                        f"unquantised, e.g. in bfloat16")


def _warn_if_a_fresh_head_stays_frozen(model: nn.Module, config: QRLoraConfig, saved: list[str]) -> None:
    """A classification head (``*ForSequenceClassification``, token, question answering, image, audio) starts
    random: frozen, the model can only guess. PEFT trains it through ``task_type`` or ``modules_to_save``; say so
    rather than let a run train for hours against a random head."""
    if config.task_type is not None or not type(model).__name__.endswith(
            ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
             "ForImageClassification", "ForAudioClassification", "ForAudioFrameClassification")):
        return
    heads = [h for h in dict.fromkeys(sum(TASK_HEADS.values(), ())) if isinstance(getattr(model, h, None), nn.Module)]
    # A head that target_modules adapted trains only its lam, scaling a basis of its random weights: frozen too.
    frozen = [h for h in heads if h not in saved and not any(
        p.requires_grad for n, p in getattr(model, h).named_parameters() if n.rpartition(".")[2] != "lam")]
    if frozen:
        adapted = any(isinstance(m, _layer_class()) for m in getattr(model, frozen[0]).modules())
        warnings.warn(f"{type(model).__name__}'s head {frozen[0]!r} is frozen"
                      + (" (target_modules adapted it: only its lam train, on a basis of its weights)" if adapted
                         else "")
                      + f", and such heads are usually freshly initialised: train it with "
                        f"modules_to_save=[{frozen[0]!r}] or task_type='SEQ_CLS' (as in PEFT)",
                      UserWarning, stacklevel=3)


def _merged_linear(layer: nn.Module, row: Optional[int]) -> nn.Linear:
    if row is None and layer.num_adapters > 1:
        raise ValueError(f"layer has {layer.num_adapters} adapters: pass adapter_name to choose the one to merge")
    return layer.to_linear(row)


def adapter_row(model: nn.Module, adapter_name: str) -> int:
    """The row of every layer's ``lam`` that holds ``adapter_name`` (a model never given a name has "default")."""
    ids = getattr(unwrap_model(model), ADAPTER_IDS_ATTR, {DEFAULT_ADAPTER: 0})
    if adapter_name not in ids:
        raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(ids)}")
    return ids[adapter_name]


def default_adapter_name(model: nn.Module) -> str:
    """The adapter a save, a merge or the checkpoint callback takes when none is named: the one the model computes
    with outside ``adapter_batch`` (the only one loaded, the one ``set_adapter`` chose, else the first loaded)."""
    root = unwrap_model(model)
    loaded = getattr(root, ADAPTER_IDS_ATTR, None) or {DEFAULT_ADAPTER: 0}
    if len(loaded) == 1:
        return next(iter(loaded))
    rows = {layer.active_adapter for _, layer in qrlora_layers(root)} or {0}
    names = [name for name, row in loaded.items() if row in rows]
    if len(rows) != 1 or len(names) != 1:
        raise ValueError(f"the model's layers compute with different adapters (rows {sorted(rows)} of "
                         f"{sorted(loaded)}): pass adapter_name=, or set_adapter(model, name) first")
    return names[0]


def module_copies(root: nn.Module) -> ModuleCopies:
    """The model's ``modules_to_save``, one copy per adapter that trains them (empty for a model without)."""
    copies = getattr(root, MODULES_TO_SAVE_ATTR, None)
    return copies if isinstance(copies, ModuleCopies) else ModuleCopies()


def lam_trains(root: nn.Module) -> bool:
    """Whether the model's adapters train (any layer's lam requires grad): a ``modules_to_save`` copy taken in then
    trains too, as ``apply_qrlora`` and ``load_adapter`` leave them; a model frozen for serving stays frozen."""
    return any(layer.lam.requires_grad for _, layer in qrlora_layers(root))


def active_adapter_name(root: nn.Module) -> str:
    """The adapter the model computes with outside ``adapter_batch``: ``set_adapter``'s choice, else the first
    loaded."""
    ids = getattr(root, ADAPTER_IDS_ATTR, None) or {DEFAULT_ADAPTER: 0}
    chosen = getattr(root, ACTIVE_ADAPTER_ATTR, None)
    return chosen if chosen in ids else min(ids, key=ids.get)


def _named_adapter_layers(model: nn.Module, adapter_name) -> tuple[nn.Module, list]:
    """(the unwrapped model, its QR-LoRA layers), for the functions that pick an adapter by name."""
    root = unwrap_model(model)
    layers = qrlora_layers(root)
    if not layers:
        raise ValueError("the model has no QR-LoRA layers (call apply_qrlora or load_adapter first)")
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be an adapter's name (str), got {type(adapter_name).__name__}")
    return root, layers


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Compute with, and train, the adapter ``adapter_name`` outside ``adapter_batch`` (PEFT's ``set_adapter``).

    Until then a model with several adapters loaded computes with the first ("default", or the first loaded).
    ``save_adapter``, ``merge_and_unload`` and ``QRLoraCheckpointCallback`` then take this adapter when none is
    named. Each ``modules_to_save`` module takes this adapter's copy into its parameters (in place), trainable
    while the adapters' lam are; one that this adapter does not train takes the base model's values, frozen.

    Training reaches only its coefficients (the others get zero gradients), but every layer keeps all adapters as
    rows of one ``lam`` parameter, which an optimizer steps as a whole: weight decay (AdamW with
    ``weight_decay`` > 0) shrinks the other adapters' rows too, and momentum (Adam's, SGD's) keeps moving the
    rows of an adapter trained before this call with the same optimizer, and the ``modules_to_save`` copy just
    copied in. Train with ``weight_decay=0`` (``Trainer``'s default) and a new optimizer after each
    ``set_adapter``, or load the other adapters after training. A model's ``state_dict`` holds the adapters as
    those rows, in the order they were loaded, without their names, and only the ``modules_to_save`` copy each
    module holds: it loads into a model whose adapters were loaded in the same order, with the same adapter set
    active (``save_adapter`` and ``load_adapter`` move one adapter by name, with its own copies).
    """
    root, layers = _named_adapter_layers(model, adapter_name)
    row = adapter_row(root, adapter_name)
    module_copies(root).hold(root, adapter_name, trainable=lam_trains(root), wrapper=parameter_holding_wrapper(model))
    for _, layer in layers:
        layer.active_adapter = row
    setattr(root, ACTIVE_ADAPTER_ATTR, adapter_name)


def merge_and_unload(model: nn.Module, *, adapter_name: Optional[str] = None) -> nn.Module:
    """Turn every ``QRLoraLinear`` back into a plain ``nn.Linear`` with W0 + Q diag(lam) R merged in.

    With several adapters loaded, ``adapter_name`` picks the one to merge (default: the one the model computes
    with, as ``default_adapter_name`` says), and the ``modules_to_save`` keep that adapter's copy (the base
    model's values where it trains none; PEFT keeps the active adapter's copy). Returns ``model`` (changed in
    place), without QR-LoRA bookkeeping; its outputs equal the adapted model's.
    """
    model = unwrap_model(model)
    refuse_bare_layer(model, "merge_and_unload")
    layers = qrlora_layers(model)
    if not layers:
        raise ValueError("the model has no QR-LoRA layers to merge")
    if adapter_name is None and getattr(model, ADAPTER_IDS_ATTR, None) is None:
        row = None  # layers given adapters by hand (add_adapter): each merges its active one, if it has one
    else:
        adapter_name = adapter_name if adapter_name is not None else default_adapter_name(model)
        row = adapter_row(model, adapter_name)
    if row is not None:  # its own modules_to_save too
        module_copies(model).hold(model, adapter_name, trainable=lam_trains(model))
    for name, layer in layers:
        try:
            merged = _merged_linear(layer, row)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        _set_submodule(model, name, merged)
    _drop_bookkeeping(model)
    return model


def _drop_bookkeeping(model: nn.Module) -> None:
    for attr in (CONFIG_ATTR, ADAPTER_IDS_ATTR, MODULES_TO_SAVE_ATTR, ACTIVE_ADAPTER_ATTR, ADAPTER_FILES_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    skip_bases_in_hf_checkpoints(model)
    keep_gradients_through_reentrant_checkpoints(model, adapted=False)


def unload(model: nn.Module) -> nn.Module:
    """Turn every ``QRLoraLinear`` back into the layer it replaced, without any adapter's update (PEFT's
    ``unload``): W0 and the bias, the same tensors (copies where a layer is merged, or was a ``Conv1D``).

    Returns ``model`` (changed in place), without QR-LoRA bookkeeping. Every base layer is formed before any is
    replaced, so an error leaves the model as it was. ``modules_to_save`` keep the values the model computes with,
    the active adapter's trained copy (as PEFT's ``unload`` does; the base model's where it trains none), and the
    other copies are dropped: ``save_adapter`` first to keep an adapter. The base layers' parameters stay frozen,
    as ``apply_qrlora`` left them.
    """
    model = unwrap_model(model)
    refuse_bare_layer(model, "unload")
    layers = qrlora_layers(model)
    if not layers:
        raise ValueError("the model has no QR-LoRA layers to unload")
    bases = []
    for name, layer in layers:
        try:
            bases.append((name, layer.base_layer()))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    for name, base in bases:
        _set_submodule(model, name, base)
    _drop_bookkeeping(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter ``adapter_name`` from every layer (PEFT's ``delete_adapter``): its row of each ``lam``
    goes, the adapters after it move up a row (their names keep them). The last adapter is not deleted: use
    ``unload`` or ``merge_and_unload``. Deleting the adapter the model computes with makes the first remaining
    one active. Its copies of ``modules_to_save`` go too. Like ``add_adapter``, each ``lam`` keeps its Parameter
    with a new shape: build optimizers after."""
    root, layers = _named_adapter_layers(model, adapter_name)
    wrapper = parameter_holding_wrapper(model)
    if wrapper is not None or any(hasattr(layer.lam, "device_mesh") for _, layer in layers):
        raise ValueError(f"delete adapters before wrapping the model in {wrapper or 'FSDP2 (fully_shard)'}: it "
                         f"keeps each lam at the shape it was given, and the next backward would fail")
    ids = dict(getattr(root, ADAPTER_IDS_ATTR, None) or {DEFAULT_ADAPTER: 0})
    row = adapter_row(root, adapter_name)
    if len(ids) == 1:
        raise ValueError(f"{adapter_name!r} is the model's only adapter: unload(model) or merge_and_unload(model) "
                         f"removes it")
    active_name = default_adapter_name(root) if len({l.active_adapter for _, l in layers}) == 1 else None
    del ids[adapter_name]
    ids = {name: r - (r > row) for name, r in ids.items()}
    for _, layer in layers:
        keep = [r for r in range(layer.num_adapters) if r != row]
        layer.set_rows(keep)
    if active_name == adapter_name or active_name is None:
        active_name = min(ids, key=ids.get)
    copies = module_copies(root)
    copies.drop(root, adapter_name)
    copies.hold(root, active_name, trainable=lam_trains(root))
    for _, layer in layers:
        layer.active_adapter = ids[active_name]
    setattr(root, ADAPTER_IDS_ATTR, ids)
    if getattr(root, ACTIVE_ADAPTER_ATTR, None) is not None:
        setattr(root, ACTIVE_ADAPTER_ATTR, active_name)
    files = getattr(root, ADAPTER_FILES_ATTR, None)
    if files and adapter_name in files:
        setattr(root, ADAPTER_FILES_ATTR, {k: v for k, v in files.items() if k != adapter_name})


def _wrapper_chain(model: nn.Module):
    """``model``, then each module it wraps: ``torch.compile``'s ``_orig_mod``, DDP / DataParallel / FSDP1's
    ``.module``."""
    while True:
        yield model
        inner = getattr(model, _COMPILED_ATTR, None)
        if not isinstance(inner, nn.Module) and (
                isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
                or type(model).__name__ == "FullyShardedDataParallel"):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return
        model = inner


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` / FSDP1 / ``torch.compile`` wrappers.

    Adapter files name modules as the unwrapped model does, so a model saved from inside a wrapper loads into a
    plain one (FSDP2's ``fully_shard`` wraps nothing: it shards the parameters in place).
    """
    for model in _wrapper_chain(model):
        pass
    return model


# Path parts that wrappers insert inside a model: FSDP1's auto-wrap, activation checkpointing's wrapper,
# torch.compile of a submodule. Adapter files name modules without them.
WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", _COMPILED_ATTR)


def canonical_name(name: str) -> str:
    """``name`` without the path parts that wrappers insert (``blocks.0._orig_mod.a`` -> ``blocks.0.a``)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAME_PARTS)


def modules_by_canonical_name(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Canonical name -> (the module's real path in ``model``, the module)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for name, module in unwrap_model(model).named_modules():
        found[canonical_name(name)] = (name, module)  # a wrapper comes before what it wraps: the innermost wins
    return found


def parameter_holding_wrapper(model: nn.Module) -> Optional[str]:
    """The name of a wrapper that keeps the parameters it was given (DDP, FSDP1), if ``model`` is or holds one."""
    chain = list(_wrapper_chain(model))
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain):
        return "DistributedDataParallel"
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in [*chain, *chain[-1].modules()]):
        return "FullyShardedDataParallel"
    return None


def _adapter_ids_in_range(model: nn.Module, adapter_ids) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
    """Adapter names or ids (one per sequence) -> an int64 tensor of rows of ``lam``, and the ids' (min, max)
    (None for no ids), read back once."""
    ids = getattr(unwrap_model(model), ADAPTER_IDS_ATTR, None)
    if ids is None:
        raise ValueError("the model has no QR-LoRA adapters (call apply_qrlora or load_adapter first)")
    if isinstance(adapter_ids, torch.Tensor):
        if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
        out = adapter_ids.long()
    else:
        if isinstance(adapter_ids, (str, int)):
            raise TypeError("adapter_ids must be a sequence (one id or name per sequence of the batch)")
        rows = []
        for a in adapter_ids:
            if isinstance(a, str):
                if a not in ids:
                    raise ValueError(f"unknown adapter {a!r}; loaded adapters: {sorted(ids)}")
                rows.append(ids[a])
            elif isinstance(a, int) and not isinstance(a, bool):
                rows.append(a)
            else:
                raise TypeError(f"adapter ids must be names (str) or ints, got {a!r}")
        out = torch.tensor(rows, dtype=torch.long)
    span = read_id_range(out) if out.numel() else None
    if span is not None and (span[0] < 0 or span[1] >= len(ids)):
        raise ValueError(f"adapter id out of range: ids must lie in [0, {len(ids)}), got {out.tolist()}")
    return out, span


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_ids: Union[torch.Tensor, Iterable[Union[int, str]]]):
    """Run one batch with a different adapter per sequence, through the model's own ``forward``.

    ``adapter_ids``: one adapter name or id per sequence (the leading batch dimension). Inside
    the ``with`` block every ``QRLoraLinear`` receives them as its ``adapter_ids`` argument::

        with adapter_batch(model, ["sst2", "default", "sst2"]):
            logits = model(**batch).logits
            out = model.generate(**batch, num_beams=4)   # each sequence's beams keep its adapter

    Inside the model's ``generate`` (beams, ``num_return_sequences``: every sequence expanded into k
    consecutive rows, the encoder of an encoder-decoder model left unexpanded), a layer input k times as
    long as the ids repeats each id k times; outside it, any batch size that does not match the ids is an
    error, as a layer given ids of the wrong length always is. Training works too, with ``backward()``
    inside the block. Under ``torch.inference_mode()`` the ids are kept as ordinary tensors, so their range
    is checked once, not in every layer. Every ``modules_to_save`` module computes each sequence with its
    adapter's copy (``modules_to_save.py``; training such a batch with another adapter's copy is refused).
    """
    # Ordinary tensors even under inference_mode: an inference tensor has no version counter to cache by.
    with torch.inference_mode(False):
        ids, span = _adapter_ids_in_range(model, adapter_ids)
        ids = ids.clone()
    root = unwrap_model(model)
    layers = [layer for _, layer in qrlora_layers(root)]
    previous = [(layer.adapter_ids, layer.adapter_id_expansions) for layer in layers]
    per_device: dict[torch.device, torch.Tensor] = {}
    shared: dict = {"generating": False}  # inside generate(): expand; and the expanded ids per (device, k)
    generating = _Generating(root, shared) if callable(getattr(root, "generate", None)) else None
    if generating is not None:
        generating.install()
    try:
        with torch.inference_mode(False):
            for layer in layers:
                device = layer.weight.device
                if device not in per_device:
                    per_device[device] = ids.to(device)
                    if span is not None:  # measured above: the layers need not read the ids back
                        remember_id_range(per_device[device], *span)
                layer.adapter_ids = per_device[device]
                layer.adapter_id_expansions = shared
        with _modules_to_save_per_sequence(root, ids, shared, parameter_holding_wrapper(model)):
            yield ids
    finally:
        if generating is not None:
            generating.remove()
        for layer, (old_ids, old_expansions) in zip(layers, previous):
            layer.adapter_ids, layer.adapter_id_expansions = old_ids, old_expansions


class _Generating(InstanceOverride):
    """The model's ``generate`` inside ``adapter_batch``: while it runs, layer inputs k times as long as the ids
    are each sequence's beams."""

    def __init__(self, root: nn.Module, shared: dict) -> None:
        super().__init__(root, "generate")
        self.shared = shared
        # generate's name, docs and signature; not its __dict__, which would overwrite this object's own attributes
        # (an outer block's _Generating is the original of an inner one)
        functools.update_wrapper(self, self.original, updated=())

    def __call__(self, *args, **kwargs):
        self.shared["generating"] = True
        try:
            return self.original(*args, **kwargs)
        finally:
            self.shared["generating"] = False


@contextlib.contextmanager
def _modules_to_save_per_sequence(root: nn.Module, ids: torch.Tensor, shared: dict, wrapper: Optional[str]):
    """Inside adapter_batch: each ``modules_to_save`` module computes every sequence with its adapter's copy (the
    base model's where that adapter trains none). The ids are read back once, and again only after a write."""
    copies = module_copies(root)
    names_by_row = {row: name for name, row in (getattr(root, ADAPTER_IDS_ATTR, None) or {}).items()}
    read: list = [None, None]  # the ids' version when read back, and their values

    def keys_for_rows(name: str):
        def keys(rows: int) -> list:
            if read[0] != ids._version:
                read[:] = [ids._version, ids.tolist()]
            per_sequence, n = read[1], len(read[1])
            used = {copies.key_for(name, names_by_row.get(a)) for a in per_sequence}
            if len(used) == 1:  # one copy for the whole batch, whatever the module's input looks like
                return [used.pop()] * rows
            if rows != n:  # inside generate(): each sequence's beams, k consecutive rows (as the layers expand)
                if not (shared.get("generating") and n and rows % n == 0):
                    raise ValueError(f"{name}: its input holds {rows} sequences, and adapter_batch was given {n} "
                                     f"adapter ids")
                per_sequence = [a for a in per_sequence for _ in range(rows // n)]
            return [copies.key_for(name, names_by_row.get(a)) for a in per_sequence]
        return keys

    with contextlib.ExitStack() as stack:
        for name in copies.names():
            stack.enter_context(routed(root, copies, name, keys_for_rows(name), wrapper=wrapper))
        yield


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the ``with`` block the model computes as its base model (PEFT's ``disable_adapter()``).

    Every ``QRLoraLinear`` acts as its frozen ``nn.Linear``, and every ``modules_to_save`` module computes with
    the base model's values (kept since ``apply_qrlora`` or ``load_adapter``; its trained parameters are not
    written): e.g. a DPO reference model, or comparing outputs with and without the adapter, without a second
    copy of the model. Merged layers are refused (unmerge first), and so is a ``modules_to_save`` module that
    shares a weight with another module (a tied LM head), which would keep computing with its trained values.
    """
    root = unwrap_model(model)
    layers = qrlora_layers(root)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{merged[0]}: layer is merged, so its weight holds the adapter; unmerge() it first")
    copies = module_copies(root)
    for name in copies.names():
        tied = tied_outside(root, name) if copies.held_by(name) is not BASE else None
        if tied is not None:
            raise ValueError(f"disable_adapters cannot give the base model: {name} (modules_to_save) shares a "
                             f"parameter with {tied} (tied weights), which holds its trained values")
    previous = [layer.adapters_disabled for _, layer in layers]
    try:
        with contextlib.ExitStack() as stack:
            for name in copies.names():
                stack.enter_context(routed(root, copies, name, lambda rows: [BASE] * rows, base_only=True,
                                           wrapper=parameter_holding_wrapper(model)))
            for _, layer in layers:
                layer.adapters_disabled = True
            yield model
    finally:
        for (_, layer), old in zip(layers, previous):
            layer.adapters_disabled = old
