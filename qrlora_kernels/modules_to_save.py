"""``modules_to_save`` per adapter: every adapter that trains a module in full has its own copy of it.

PEFT wraps such a module (``ModulesToSaveWrapper``: the original plus one copy per adapter, under new
``state_dict`` keys). Here the model keeps its modules and their keys (``apply_qrlora`` converts in place, so
transformers' saving, loading and weight tying see the model they know). The module itself holds the values of
the adapter the model computes with, or the base model's where that adapter trains none; every other adapter's
values, and the base model's, are kept beside it, outside the module tree, in the root's ``ModuleCopies``
(``model.qrlora_modules_to_save``):

* ``set_adapter`` copies the chosen adapter's values into the module (in place: the same Parameters, which an
  optimizer holds) and keeps the outgoing ones. A module that adapter does not train gets the base values back
  and is frozen.
* ``adapter_batch`` mixing adapters whose copies differ, and ``disable_adapters``, compute such a module with
  the other values (``torch.func.functional_call``, one call per group of sequences that share a copy) without
  writing into its parameters, so a graph recorded before the block still backpropagates.

Copies are kept where the module was when they were made, and follow its device and dtype when next used.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

BASE = None  # the key of the base model's values (adapter names are non-empty str)
_IN_MODULE = None  # a copy's entry while its values are the module's own


def _clone(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s tensors as new tensors on the devices and dtypes of ``like`` (the module's)."""
    return {k: v.detach().to(device=like[k].device, dtype=like[k].dtype, copy=True) for k, v in state.items()}


def _describe(key: Optional[str]) -> str:
    return "the base model's values" if key is BASE else f"the copy of adapter {key!r}"


class ModuleCopies:
    """Per ``modules_to_save`` module (by its canonical name): the values of each adapter that trains it and of
    the base model. Exactly one entry per module is ``_IN_MODULE``: the values the module holds now."""

    def __init__(self) -> None:
        self._copies: dict[str, dict[Optional[str], Optional[dict[str, torch.Tensor]]]] = {}

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The modules some adapter trains in full."""
        return sorted(self._copies)

    def __bool__(self) -> bool:
        return bool(self._copies)

    def owned_by(self, adapter: str) -> list[str]:
        """The modules ``adapter`` trains in full (and saves with it)."""
        return sorted(name for name, copies in self._copies.items() if adapter in copies)

    def key_for(self, name: str, adapter: Optional[str]) -> Optional[str]:
        """Whose values ``name`` computes with for ``adapter``: its own copy, else the base model's."""
        return adapter if adapter is not BASE and adapter in self._copies[name] else BASE

    def live(self, name: str) -> Optional[str]:
        """Whose values the module holds now."""
        return next(key for key, state in self._copies[name].items() if state is _IN_MODULE)

    def values(self, root: nn.Module, name: str, key: Optional[str],
               module: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """``key``'s values of module ``name``, as its ``state_dict``: the module's own tensors when they are
        ``key``'s, else the kept copy, moved to the module's devices and dtypes (kept so, for the next use)."""
        own = (module if module is not None else _module(root, name)).state_dict()
        state = self._copies[name][key]
        if state is _IN_MODULE:
            return {k: v.detach() for k, v in own.items()}
        if any(v.device != own[k].device or v.dtype != own[k].dtype for k, v in state.items()):
            state = self._copies[name][key] = _clone(state, own)
        return state

    # ------------------------------------------------------------------ changing
    def train_in_place(self, root: nn.Module, name: str, adapter: str) -> None:
        """``apply_qrlora``: ``adapter`` trains ``name`` from its current (base) values, which are kept."""
        module = _module(root, name)
        own = module.state_dict()
        self._copies[name] = {BASE: _clone(own, own), adapter: _IN_MODULE}
        module.requires_grad_(True)

    def put(self, root: nn.Module, name: str, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """``load_adapter``: ``state`` becomes ``adapter``'s copy of ``name`` (the module's values where they
        are ``adapter``'s; a module no adapter trained so far holds the base model's)."""
        module = _module(root, name)
        copies = self._copies.setdefault(name, {BASE: _IN_MODULE})
        if copies.get(adapter, False) is _IN_MODULE:
            module.load_state_dict(state, strict=True)
        else:
            copies[adapter] = _clone(state, module.state_dict())

    def drop(self, root: nn.Module, adapter: str, *, keep: frozenset = frozenset()) -> None:
        """``adapter`` no longer has a copy of any module but those in ``keep``. A module that held its values
        gets the base model's back, until ``show`` chooses again."""
        for name in [n for n in self.owned_by(adapter) if n not in keep]:
            copies = self._copies[name]
            if copies[adapter] is _IN_MODULE:
                _module(root, name).load_state_dict(self.values(root, name, BASE), strict=True)
                copies[BASE] = _IN_MODULE
            del copies[adapter]

    def show(self, root: nn.Module, adapter: Optional[str]) -> None:
        """Make every module hold ``adapter``'s values (the base model's where it has no copy): trainable where
        they are an adapter's, frozen where they are the base model's. A module no adapter trains any more holds
        the base values and is forgotten."""
        plan = [(name, _module(root, name), self.key_for(name, adapter), self.live(name)) for name in self._copies]
        for name, module, want, live in plan:  # all checked before any changes
            if want != live:
                _refuse_sharded(module, name)
        for name, module, want, live in plan:
            copies = self._copies[name]
            if want != live:
                outgoing = {k: v.detach().clone() for k, v in module.state_dict().items()}
                module.load_state_dict(self.values(root, name, want, module), strict=True)
                copies[live], copies[want] = outgoing, _IN_MODULE
            module.requires_grad_(want is not BASE)
            if set(copies) == {BASE}:
                del self._copies[name]


def _module(root: nn.Module, name: str) -> nn.Module:
    from .model import modules_by_canonical_name
    found = modules_by_canonical_name(root).get(name)
    if found is None:
        raise ValueError(f"{name}: module (modules_to_save) is no longer in the model")
    return found[1]


def _refuse_sharded(module: nn.Module, name: str) -> None:
    if any(hasattr(p, "device_mesh") for p in module.parameters()):
        raise ValueError(f"{name}: its parameters are sharded (FSDP2 fully_shard), and it would compute with other "
                         f"values than it holds (another adapter's modules_to_save copy, or the base model's): "
                         f"switch adapters, or disable them, before sharding the model")


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
        return type(first)(torch.cat(parts).index_select(0, inverse.to(parts[0].device))
                           for parts in zip(*outputs))
    raise TypeError(f"{name}: its forward returns {type(first).__name__}, which a batch mixing adapters with their "
                    f"own copies of it cannot put back together (a tensor, or a tuple of tensors, along the batch)")


@contextlib.contextmanager
def routed(root: nn.Module, copies: ModuleCopies, name: str,
           keys_for_rows: Callable[[int], list[Optional[str]]]) -> Iterator[None]:
    """Inside the block, module ``name`` computes each sequence (row of its input's leading dimension) with the
    values ``keys_for_rows(rows)`` gives it: one call per group of rows that share a copy, the module's own
    forward for the values it holds, ``functional_call`` with the kept copy for the others. Its parameters are
    not written. Gradients reach only the values the module holds: a group computed with another adapter's copy
    while the module trains is refused, rather than leaving that copy untrained."""
    module = _module(root, name)
    tied = tied_outside(root, name)
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    original = module.forward
    inside = [False]

    def forward(*args, **kwargs):
        if inside[0]:  # functional_call's own call of the module
            return original(*args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.dim():
            raise ValueError(f"{name}: cannot tell its input's sequences apart (no tensor with a batch dimension)")
        rows = first.shape[0]
        keys = keys_for_rows(rows)
        live = copies.live(name)
        if all(key == live for key in keys):
            return original(*args, **kwargs)
        _refuse_sharded(module, name)
        if tied is not None:
            raise ValueError(f"{name} (modules_to_save) shares a parameter with {tied} (tied weights), which would "
                             f"keep computing with {_describe(live)}: compute with one adapter at a time "
                             f"(set_adapter)")
        groups: dict[Optional[str], list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        others = [key for key in groups if key not in (live, BASE)]
        if others and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{name} (modules_to_save) trains {_describe(live)}, and this batch also computes with "
                             f"{_describe(others[0])}, which would get no gradient: train one adapter at a time "
                             f"(set_adapter), and mix adapters under torch.no_grad() or inference_mode()")
        outputs, order = [], []
        for key, positions in groups.items():
            index = torch.tensor(positions, device=first.device)
            sub_args = tuple(_split_rows(a, index, rows) for a in args)
            sub_kwargs = {k: _split_rows(v, index, rows) for k, v in kwargs.items()}
            if key == live:
                outputs.append(original(*sub_args, **sub_kwargs))
            else:
                inside[0] = True
                try:
                    outputs.append(torch.func.functional_call(module, copies.values(root, name, key, module),
                                                              sub_args, sub_kwargs))
                finally:
                    inside[0] = False
            order += positions
        return outputs[0] if len(outputs) == 1 else _joined(name, outputs, order)

    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward
