"""Gradients for the adapters inside blocks that reentrant activation checkpointing recomputes.

``torch.utils.checkpoint(..., use_reentrant=True)`` runs a block without building its graph and connects the block's
backward only through inputs that require a gradient. In an adapted model everything below the first block is frozen,
so nothing does, and every ``lam`` inside a checkpointed block gets no gradient: an error where nothing else trains,
silence where a trained head (``modules_to_save``) gives the loss a gradient anyway, so that only the head trains.
transformers' ``gradient_checkpointing_enable`` is reentrant by default before 5.x (and wherever
``use_reentrant=True`` is asked for), and it makes the embeddings' output require a gradient only for PEFT models
(4.x) or for models fed ``input_ids`` (5.x); PEFT does it when its model is made, if checkpointing is on by then.

Here a forward hook on the model's input embeddings does it whenever the model trains with a block that
transformers checkpoints, not known to be non-reentrant, for any model with input embeddings (ViT's patch
embeddings, too), and at no other time: it costs the gradient of the first block's input, which non-reentrant
checkpointing and an unchecked model do not need.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


class InputsRequireGrad:
    """The forward hook. An object holding its model, not a closure, so that ``copy.deepcopy`` of the model gives
    the copy a hook of its own (a closure would keep reading the original's training state)."""

    def __init__(self, model: nn.Module):
        self.model = model
        # transformers switches checkpointing on only in modules that have the attribute from the start, so these
        # are the modules to look at in every training step: a few dozen instead of every module (a 32-layer Llama
        # has 423, which cost about 0.7 ms of Python per step to walk). None, where none has it: walk them all.
        self.blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")] or None

    def __call__(self, module: nn.Module, args, output):
        if (isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad
                and torch.is_grad_enabled() and self.model.training
                and reentrant_checkpointing(self.model, self.blocks)):
            output.requires_grad_(True)


def reentrant_checkpointing(model: nn.Module, blocks: list[nn.Module] | None = None) -> bool:
    """Whether a block of ``model`` (of ``blocks``, where given) is checkpointed by transformers
    (``gradient_checkpointing = True``) with a function not known to be non-reentrant (transformers passes
    ``functools.partial(checkpoint, use_reentrant=...)``)."""
    for module in model.modules() if blocks is None else blocks:
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if not (isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False):
                return True
    return False


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        embeddings = get()
    except (NotImplementedError, AttributeError):  # transformers' base class raises where a model has none
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _remove_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, InputsRequireGrad)]:
            del module._forward_hooks[key]


def keep_gradients_through_reentrant_checkpoints(model: nn.Module, adapted: bool) -> None:
    """Hook ``model``'s input embeddings while it has QR-LoRA layers (``adapted``); take the hook away otherwise.

    Called after every change of the model's layers (``apply_qrlora``, ``load_adapter``, ``merge_and_unload``).
    Found again by type, not by a stored handle, which a deep copy would leave pointing at the original."""
    _remove_hooks(model)
    embeddings = _input_embeddings(model) if adapted else None
    if embeddings is not None:
        embeddings.register_forward_hook(InputsRequireGrad(model))
