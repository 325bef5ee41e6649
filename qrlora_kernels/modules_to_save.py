"""``modules_to_save`` per adapter: every adapter that trains a module in full has its own copy of it.

PEFT wraps such a module (``ModulesToSaveWrapper``: the original plus one copy per adapter, under new
``state_dict`` keys). Here the model keeps its modules and their keys (``apply_qrlora`` converts in place, so
transformers' saving, loading and weight tying see the model they know). The module itself holds the values of
the adapter the model computes with, or the base model's where that adapter trains none; every other adapter's
values, and the base model's, are kept beside it, outside the module tree, in the root's ``ModuleCopies``
(``model.qrlora_modules_to_save``):

* ``set_adapter`` copies the chosen adapter's values into the module (in place: the same Parameters, which an
  optimizer holds) and keeps the outgoing ones. The module trains if the adapters' lam do (a model frozen for
  serving stays frozen); a module that adapter does not train gets the base values back, frozen.
* ``adapter_batch`` mixing adapters whose copies differ, and ``disable_adapters``, compute such a module with
  the other values (``torch.func.functional_call``, one call per group of sequences that share a copy) without
  writing into its parameters, so a graph recorded before the block still backpropagates. Blocks nest, and
  ``disable_adapters`` wins, as it does in the QR-LoRA layers.

Copies are kept where the module was when they were made, and follow its device and dtype when next used.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .instance_override import InstanceOverride

BASE = None  # the key of the base model's values (adapter names are non-empty str)


class _Held:
    """The entry of the copy whose values the module holds: one instance, also after a deepcopy or a pickle."""

    def __repr__(self) -> str:
        return "<values held by the module>"

    def __reduce__(self) -> str:
        return "_HELD"


_HELD = _Held()


def _clone(state: dict[str, torch.Tensor],
           like: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """``state``'s tensors as new tensors, on the devices and dtypes of ``like`` (the module's) if given. Ordinary
    tensors even under ``inference_mode``: a copy made there must serve a later training step."""
    like = state if like is None else like
    with torch.inference_mode(False):
        return {k: v.detach().to(device=like[k].device, dtype=like[k].dtype, copy=True) for k, v in state.items()}


def _describe(key: Optional[str]) -> str:
    return "the base model's values" if key is BASE else f"the copy of adapter {key!r}"


class ModuleCopies:
    """Per ``modules_to_save`` module (by its canonical name): the values of each adapter that trains it and of
    the base model. Exactly one entry per module is ``_HELD``: the values the module holds now."""

    def __init__(self) -> None:
        self._copies: dict[str, dict[Optional[str], object]] = {}

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The modules some adapter trains in full."""
        return sorted(self._copies)

    def __bool__(self) -> bool:
        return bool(self._copies)

    def owned_by(self, adapter: str) -> list[str]:
        """The modules ``adapter`` trains in full (and saves with it)."""
        return sorted(name for name, copies in self._copies.items() if adapter in copies)

    def owners(self, name: str) -> list[str]:
        """The adapters that train ``name`` in full."""
        return sorted(key for key in self._copies[name] if key is not BASE)

    def key_for(self, name: str, adapter: Optional[str]) -> Optional[str]:
        """Whose values ``name`` computes with for ``adapter``: its own copy, else the base model's."""
        return adapter if adapter is not BASE and adapter in self._copies[name] else BASE

    def held_by(self, name: str) -> Optional[str]:
        """Whose values the module holds now."""
        return next(key for key, state in self._copies[name].items() if state is _HELD)

    def values(self, root: nn.Module, name: str, key: Optional[str],
               module: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """``key``'s values of module ``name``, as its ``state_dict``: the module's own tensors when they are
        ``key``'s, else the kept copy, moved to the module's devices and dtypes (kept so, for the next use)."""
        own = (module if module is not None else _module(root, name)).state_dict()
        state = self._copies[name][key]
        if state is _HELD:
            return {k: v.detach() for k, v in own.items()}
        if any(v.device != own[k].device or v.dtype != own[k].dtype for k, v in state.items()):
            state = self._copies[name][key] = _clone(state, own)
        return state

    # ------------------------------------------------------------------ changing
    def train_in_place(self, root: nn.Module, name: str, adapter: str) -> None:
        """``apply_qrlora``: ``adapter`` trains ``name`` from its current (base) values, which are kept."""
        module = _module(root, name)
        own = module.state_dict()
        self._copies[name] = {BASE: _clone(own), adapter: _HELD}
        module.requires_grad_(True)

    def set_copy(self, root: nn.Module, name: str, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """``load_adapter``: ``state`` becomes ``adapter``'s copy of ``name`` (written into the module where it
        holds ``adapter``'s values; a module no adapter trained so far holds the base model's)."""
        module = _module(root, name)
        copies = self._copies.setdefault(name, {BASE: _HELD})
        if copies.get(adapter) is _HELD:
            module.load_state_dict(state, strict=True)
        else:
            copies[adapter] = _clone(state, module.state_dict())

    def drop(self, root: nn.Module, adapter: str, *, keep: frozenset = frozenset()) -> None:
        """``adapter`` no longer has a copy of any module but those in ``keep``. A module that held its values
        gets the base model's back (frozen), until ``hold`` chooses again."""
        for name in [n for n in self.owned_by(adapter) if n not in keep]:
            copies = self._copies[name]
            if copies[adapter] is _HELD:
                module = _module(root, name)
                module.load_state_dict(self.values(root, name, BASE, module), strict=True)
                module.requires_grad_(False)
                copies[BASE] = _HELD
            del copies[adapter]

    def hold(self, root: nn.Module, adapter: Optional[str], *, trainable: bool,
             wrapper: Optional[str] = None) -> None:
        """Make every module hold ``adapter``'s values (the base model's where it has no copy). A module that
        takes an adapter's copy trains if ``trainable`` (the adapters' lam train), one that takes the base values
        is frozen, and one that keeps its values keeps its ``requires_grad``. A module no adapter trains any
        more holds the base values and is forgotten. ``wrapper``: the name of a wrapper that fixed the set of
        trained parameters (DDP), under which no module may start or stop training."""
        plan = [(name, _module(root, name), self.key_for(name, adapter), self.held_by(name))
                for name in self._copies]
        for name, module, want, held in plan:  # all checked before any changes
            if want == held:
                continue
            refuse_sharded(root, module, name, wrapper)
            trains = trainable and want is not BASE
            if wrapper is not None and trains != any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"{name} (modules_to_save) would {'start' if trains else 'stop'} training with "
                                 f"{_describe(want)}, and {wrapper} keeps the set of trained parameters it was "
                                 f"given (its gradients would no longer be synchronised): choose the adapter before "
                                 f"wrapping the model")
        for name, module, want, held in plan:
            copies = self._copies[name]
            if want != held:
                outgoing = _clone(module.state_dict())
                module.load_state_dict(self.values(root, name, want, module), strict=True)
                copies[held], copies[want] = outgoing, _HELD
                module.requires_grad_(trainable and want is not BASE)
            if set(copies) == {BASE}:
                del self._copies[name]


def _module(root: nn.Module, name: str) -> nn.Module:
    from .model import modules_by_canonical_name
    found = modules_by_canonical_name(root).get(name)
    if found is None:
        raise ValueError(f"{name}: module (modules_to_save) is no longer in the model")
    return found[1]


def _sharded(root: nn.Module, module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) may manage ``module``'s parameters: they are DTensors at rest, plain tensors
    between its unit's forward and backward, after a forward without gradients or one that raised; so any module
    inside a unit counts (also parameters the unit ignores: choose the adapter before sharding)."""
    if any(hasattr(p, "device_mesh") for p in module.parameters()):
        return True
    return any(any(c.__name__ == "FSDPModule" for c in type(unit).__mro__) and any(m is module for m in unit.modules())
               for unit in root.modules())


_FSDP1 = "FullyShardedDataParallel"


def _sharding_refusal(name: str, wrapper: Optional[str], fsdp2: bool) -> Optional[str]:
    """Why module ``name`` cannot compute with other values than it holds, if a sharding wrapper owns them:
    ``wrapper`` FSDP1 (whose flat parameters hide the module's own during a forward), or FSDP2."""
    other = "(another adapter's modules_to_save copy, or the base model's)"
    if wrapper == _FSDP1:
        return (f"{name}: its parameters are flattened and sharded by FullyShardedDataParallel, and it would take or "
                f"compute with other values than it holds {other}: choose the adapter before wrapping the model")
    if fsdp2:
        return (f"{name}: its parameters are sharded (FSDP2 fully_shard: it is or lies inside a unit), and it would "
                f"take or compute with other values than it holds {other}: switch adapters, or disable them, before "
                f"sharding the model")
    return None


def refuse_sharded(root: nn.Module, module: nn.Module, name: str, wrapper: Optional[str] = None) -> None:
    """Refuse, naming ``name``, to give a module other values than it holds where a sharding wrapper owns them."""
    refusal = _sharding_refusal(name, wrapper, wrapper != _FSDP1 and _sharded(root, module))
    if refusal is not None:
        raise ValueError(refusal)


def tied_outside(root: nn.Module, name: str) -> Optional[str]:
    """The name of a parameter outside module ``name`` that is one of its parameters (tied weights: an LM head
    and the input embeddings), if any."""
    module = _module(root, name)
    own = {id(p) for p in module.parameters()}
    inside = tuple(f"{path}." for path, m in root.named_modules() if m is module)
    for path, p in root.named_parameters(remove_duplicate=False):
        if id(p) in own and not path.startswith(inside):
            return path
    return None


def _split_rows(value, index: torch.Tensor, rows: int):
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
        return value.index_select(0, index.to(value.device))
    return value


def _joined(name: str, outputs: list, order: list[int]):
    """The groups' outputs put back in the batch's order."""
    first = outputs[0]
    inverse = torch.argsort(torch.tensor(order))
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs).index_select(0, inverse.to(first.device))
    if isinstance(first, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in first):
        parts = [torch.cat(group).index_select(0, inverse.to(group[0].device)) for group in zip(*outputs)]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)  # a namedtuple, or not
    raise TypeError(f"{name}: its forward returns {type(first).__name__}, which a batch mixing adapters with their "
                    f"own copies of it cannot put back together (a tensor, or a tuple of tensors, along the batch)")


@contextlib.contextmanager
def routed(root: nn.Module, copies: ModuleCopies, name: str, keys_for_rows: Callable[[int], list[Optional[str]]],
           *, base_only: bool = False, wrapper: Optional[str] = None) -> Iterator[None]:
    """Inside the block, module ``name`` computes each sequence (row of its input's leading dimension) with the
    values ``keys_for_rows(rows)`` gives it: one call per group of rows that share a copy, the module's own
    forward for the values it holds, ``functional_call`` with the kept copy for the others. Its parameters are
    not written. Gradients reach only the values the module holds: a group computed with another adapter's copy
    while anything in the model trains is refused, rather than training that adapter's lam and leaving its copy
    untrained.

    Blocks nest: the innermost decides, except that a ``base_only`` block (``disable_adapters``) anywhere wins,
    as a disabled QR-LoRA layer ignores the ids of an ``adapter_batch`` around or inside it. ``wrapper``: the
    parameter-holding wrapper the model is in, if any (``parameter_holding_wrapper``)."""
    module = _module(root, name)
    routing = module.__dict__.get("forward")
    if not (isinstance(routing, _RoutedForward) and routing.owner is module):
        routing = _RoutedForward(root, copies, name, module, wrapper)
        routing.install()
    entry = (keys_for_rows, base_only)
    routing.routes.append(entry)
    try:
        yield
    finally:
        del routing.routes[next(i for i, e in enumerate(routing.routes) if e is entry)]
        if not routing.routes:
            routing.remove()


class _RoutedForward(InstanceOverride):
    """A routed module's forward, while blocks route it (copies of the module get their own forward back)."""

    def __init__(self, root: nn.Module, copies: ModuleCopies, name: str, module: nn.Module,
                 wrapper: Optional[str]) -> None:
        super().__init__(module, "forward")
        self.root, self.copies, self.name = root, copies, name
        self.tied = tied_outside(root, name)
        self.sharding_refusal = _sharding_refusal(name, wrapper, wrapper != _FSDP1 and _sharded(root, module))
        self.routes: list = []  # (keys_for_rows, base_only) per block, outermost first
        self.inside = False

    def __call__(self, *args, **kwargs):
        name, module, copies = self.name, self.owner, self.copies
        if self.inside or not self.routes:  # functional_call's own call; a shallow copy's, after the block
            return self.original(*args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.dim():
            raise ValueError(f"{name}: cannot tell its input's sequences apart (no tensor with a batch dimension)")
        rows = first.shape[0]
        disabling = [fn for fn, base_only in self.routes if base_only]
        keys = (disabling or [self.routes[-1][0]])[0](rows)
        held = copies.held_by(name)
        if all(key == held for key in keys):
            return self.original(*args, **kwargs)
        if self.sharding_refusal is not None:
            raise ValueError(self.sharding_refusal)
        if self.tied is not None:
            raise ValueError(f"{name} (modules_to_save) shares a parameter with {self.tied} (tied weights), which "
                             f"would keep computing with {_describe(held)}: compute with one adapter at a time "
                             f"(set_adapter)")
        groups: dict[Optional[str], list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        others = [key for key in groups if key not in (held, BASE)]
        if others and torch.is_grad_enabled() and any(p.requires_grad for p in self.root.parameters()):
            raise ValueError(f"{name} (modules_to_save) holds {_describe(held)}, and this batch also computes with "
                             f"{_describe(others[0])}, which would get no gradient while the model trains: train one "
                             f"adapter at a time (set_adapter), and mix adapters under torch.no_grad() or "
                             f"inference_mode()")
        outputs, order = [], []
        for key, positions in groups.items():
            index = torch.tensor(positions, device=first.device)
            sub_args = tuple(_split_rows(a, index, rows) for a in args)
            sub_kwargs = {k: _split_rows(v, index, rows) for k, v in kwargs.items()}
            if key == held:
                outputs.append(self.original(*sub_args, **sub_kwargs))
            else:
                self.inside = True
                try:
                    # A dict of its own: functional_call writes the module's tensors back into the one it gets
                    # (FSDP2's own, where it swapped them in meanwhile).
                    values = dict(copies.values(self.root, name, key, module))
                    outputs.append(torch.func.functional_call(module, values, sub_args, sub_kwargs))
                finally:
                    self.inside = False
            order += positions
        return outputs[0] if len(outputs) == 1 else _joined(name, outputs, order)
