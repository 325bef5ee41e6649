"""Leaving a transformers model's frozen weights out of its checkpoints, and checking them when one is loaded.

``QRLoraCheckpointCallback`` (``trainer_callback``) calls ``leave_out`` while ``Trainer`` trains: ``save_pretrained``
then writes what training changes, without the frozen weights of the backbone (``model.base_model``) and of the LM
head, plus a record of them, the buffer ``qrlora_frozen_weights``: one 16-byte hash per left-out weight (its name,
dtype, shape and a sample of its values). Task heads outside the backbone (``classifier``, ``score``,
``qa_outputs``, DistilBERT's ``pre_classifier``, ...), which transformers initialises at random when it loads a
base checkpoint, are kept even when frozen.

Every adapted ``PreTrainedModel`` carries ``check_records_on_load``'s hooks (installed with the bases' ignore list,
``model.skip_bases_in_hf_checkpoints``). They act only on a ``state_dict`` that holds such a record: it must match
the model's own frozen weights, else the load is refused naming the first weight that differs; when it matches,
those weights are not missing (a resume loads what trained onto the rebuilt base model).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from .adapter_io import sample_hash
from .model import saved_key_variants

RECORD_BUFFER = "qrlora_frozen_weights"
_ACTIVE_ATTR = "_qrlora_frozen_weights_left_out"  # the model's one active LeftOut
_HOOKED_ATTR = "_qrlora_checks_records_on_load"
_FORGIVEN_ATTR = "_qrlora_left_out_keys_loaded"  # from the pre-hook to the post-hook of one load


def left_out_names(owner: nn.Module) -> list[str]:
    """The parameters ``leave_out`` leaves out of ``owner``'s checkpoints: frozen ones of the backbone (all of a
    model that is its own backbone) and of the output embeddings (the LM head), every name of a tied one."""
    backbone = getattr(owner, "base_model", owner)
    prefix = None if backbone is owner else f"{owner.base_model_prefix}."
    head = None
    get_output = getattr(owner, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except (NotImplementedError, AttributeError):
            head = None
    lm_head = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return sorted(name for name, p in owner.named_parameters(remove_duplicate=False)
                  if not p.requires_grad and (prefix is None or name.startswith(prefix) or id(p) in lm_head))


def record(owner: nn.Module, names: list[str]) -> torch.Tensor:
    """One 16-byte row per name (on the CPU): a hash of the name and of the weight's ``sample_hash``."""
    rows = [list(hashlib.blake2b(name.encode() + sample_hash(owner.get_parameter(name)), digest_size=16).digest())
            for name in names]
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(rows), 16)


class LeftOut:
    """``leave_out``'s changes to one model, until ``undo`` (idempotent)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.names = left_out_names(owner)
        device = next((p.device for p in owner.parameters()), torch.device("cpu"))
        owner.register_buffer(RECORD_BUFFER, record(owner, self.names).to(device), persistent=True)
        keys = saved_key_variants(self.names)
        before = set(owner._keys_to_ignore_on_save or ())
        self.added = keys - before
        owner._keys_to_ignore_on_save = before | keys
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        self.active = False
        if getattr(self.owner, _ACTIVE_ATTR, None) is self:
            delattr(self.owner, _ACTIVE_ATTR)
            if RECORD_BUFFER in self.owner._buffers:
                delattr(self.owner, RECORD_BUFFER)
        self.owner._keys_to_ignore_on_save = set(self.owner._keys_to_ignore_on_save or ()) - self.added


def leave_out(owner: nn.Module) -> LeftOut:
    """From now until the returned object's ``undo``, ``owner.save_pretrained`` leaves out ``left_out_names`` and
    writes their record. A model has one such state: an earlier one (another callback's) is undone first."""
    earlier: Optional[LeftOut] = getattr(owner, _ACTIVE_ATTR, None)
    if earlier is not None:
        earlier.undo()
    check_records_on_load(owner)
    left = LeftOut(owner)
    setattr(owner, _ACTIVE_ATTR, left)
    return left


def active(owner: nn.Module) -> Optional[LeftOut]:
    return getattr(owner, _ACTIVE_ATTR, None)


def check_records_on_load(owner: nn.Module) -> None:
    """Install (once) the load hooks that check a loaded record and forgive the weights it stands for."""
    if getattr(owner, _HOOKED_ATTR, False):
        return
    owner.register_load_state_dict_pre_hook(_check_record)
    owner.register_load_state_dict_post_hook(_forgive_left_out)
    setattr(owner, _HOOKED_ATTR, True)


# Module-level functions, not closures: a deepcopy of the model gets hooks that act on the copy.
def _check_record(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    saved = state_dict.pop(prefix + RECORD_BUFFER, None)  # load_state_dict hands the hooks its own copy
    if saved is None:
        return  # a checkpoint that holds its frozen weights
    # What the checkpoint left out: the weights that are frozen here and absent there (one that was unfrozen
    # during training, and so saved, is frozen again in a freshly converted model).
    names = [name for name in left_out_names(module) if prefix + name not in state_dict]
    ours = record(module, names)
    saved = saved.to("cpu")
    if saved.shape == ours.shape and torch.equal(saved, ours):
        forgiven = {prefix + name for name in names} | {prefix + RECORD_BUFFER}
        setattr(module, _FORGIVEN_ATTR, getattr(module, _FORGIVEN_ATTR, set()) | forgiven)
        return
    if saved.shape != ours.shape:
        problem = (f"it left out {saved.shape[0]} frozen weights where this model would leave out {ours.shape[0]} "
                   f"(other frozen parameters, or another model)")
    else:
        row = int((saved != ours).any(dim=1).nonzero()[0])
        problem = (f"its frozen weight {names[row]!r} differs from this model's (values, dtype or shape; a weight "
                   f"that from_pretrained initialised at random differs each time unless transformers.set_seed ran "
                   f"before it)")
    error_msgs.append(f"this checkpoint was saved by QRLoraCheckpointCallback without the frozen weights, and "
                      f"{problem}: resume on the base model it was trained on, converted with the same config, or "
                      f"train with QRLoraCheckpointCallback(frozen_weights=True), whose checkpoints hold them")


def _forgive_left_out(module, incompatible_keys):
    forgiven = module.__dict__.pop(_FORGIVEN_ATTR, None)
    if forgiven:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in forgiven]
