"""Leaving a transformers model's frozen weights out of its checkpoints, and checking them when one is loaded.

``QRLoraCheckpointCallback`` (``trainer_callback``) calls ``leave_out`` while ``Trainer`` trains: ``save_pretrained``
then writes what training changes, without the frozen weights of the backbone (``model.base_model``) and of the LM
head, plus a record of them, the buffer ``qrlora_frozen_weights``: per left-out weight, a hash of its name and its
``weight_fingerprint`` (dtype, shape, a hash of a sample of its values, and float64 sums that catch a change
anywhere in it). Task heads outside the backbone (``classifier``, ``score``, ``qa_outputs``, DistilBERT's
``pre_classifier``, ...), which transformers initialises at random when it loads a base checkpoint, are kept even
when frozen.

Every adapted ``PreTrainedModel`` carries ``install_hooks``' hooks (installed with the bases' ignore list,
``model.skip_bases_in_hf_checkpoints``). At a load they act only on a ``state_dict`` that holds such a record:
each weight it stands for must be in the model unchanged, else the load is refused naming the first that differs;
then those weights are not missing (a resume loads what trained onto the rebuilt base model). Before a
``state_dict`` is taken, what is left out follows what is frozen then (a weight unfrozen during training is saved).
"""
from __future__ import annotations

import hashlib
import struct
import sys
from typing import Optional

import torch
from torch import nn

from .adapter_io import _same_fingerprint, weight_fingerprint
from .model import output_embeddings, saved_key_variants

RECORD_BUFFER = "qrlora_frozen_weights"
_ACTIVE_ATTR = "_qrlora_frozen_weights_left_out"  # the model's one active LeftOut
_HOOKED_ATTR = "_qrlora_checks_records_on_load"
_FORGIVEN_ATTR = "_qrlora_left_out_keys_loaded"  # from the pre-hook to the post-hook of one load


def left_out_names(owner: nn.Module) -> list[str]:
    """The parameters ``leave_out`` leaves out of ``owner``'s checkpoints: frozen ones of the backbone (all of a
    model that is its own backbone) and of the output embeddings (the LM head), every name of a tied one."""
    backbone = getattr(owner, "base_model", owner)
    prefix = None if backbone is owner else f"{owner.base_model_prefix}."
    head = output_embeddings(owner)
    lm_head = {id(p) for p in head.parameters()} if head is not None else set()
    return sorted(name for name, p in owner.named_parameters(remove_duplicate=False)
                  if not p.requires_grad and (prefix is None or name.startswith(prefix) or id(p) in lm_head))


# A record row: blake2b(name) (8 bytes), the weight's sample_hash (16), its float64 sum and sum of squares (8 + 8):
# ``weight_fingerprint``'s identity of the weight (the sums catch a change anywhere in it), found again by name.
_NAME_BYTES, _SAMPLE_END, _ROW_BYTES = 8, 24, 40


def _name_hash(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=_NAME_BYTES).digest()


def _row(name: str, weight: torch.Tensor) -> bytes:
    fingerprint = weight_fingerprint(weight, moment=False)  # (the record's rows hold the two sums only)
    return (_name_hash(name) + bytes.fromhex(fingerprint["sample_hash"])
            + struct.pack("<dd", fingerprint["sum"], fingerprint["sum_sq"]))


def _same_weight(row: bytes, weight: torch.Tensor) -> bool:
    total, total_sq = struct.unpack("<dd", row[_SAMPLE_END:_ROW_BYTES])
    saved = {"sample_hash": row[_NAME_BYTES:_SAMPLE_END].hex(), "sum": total, "sum_sq": total_sq}
    return _same_fingerprint(weight_fingerprint(weight, moment=False), saved, weight.numel())


def record(owner: nn.Module, names: list[str]) -> torch.Tensor:
    """One row per name (on the CPU), ``_ROW_BYTES`` bytes each: the weight's name and ``weight_fingerprint``."""
    rows = [list(_row(name, owner.get_parameter(name))) for name in names]
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(rows), _ROW_BYTES)


def inside_trainer_checkpoint() -> bool:
    """Whether this call runs inside transformers' ``Trainer._save_checkpoint`` (a frame of it, on a Trainer, is on
    the stack): Trainer's own checkpoint writes, and not ``trainer.save_model()`` or any other save."""
    trainer = getattr(sys.modules.get("transformers"), "Trainer", None)
    frame = sys._getframe(1)
    while frame is not None and trainer is not None:
        if frame.f_code.co_name == "_save_checkpoint" and isinstance(frame.f_locals.get("self"), trainer):
            return True
        frame = frame.f_back
    return False


class LeftOut:
    """``leave_out``'s changes to one model, until ``undo`` (idempotent). ``refresh`` runs before every
    ``state_dict`` of the model, so a checkpoint leaves out (and records) what is frozen when it is written.

    ``only_in_checkpoints``: only inside Trainer's checkpoint writes (``inside_trainer_checkpoint``); any other
    ``state_dict`` is whole, without the record. So a ``trainer.save_model()`` after a ``train()`` stopped by an
    exception or Ctrl-C (which never reaches the callback's ``on_train_end``) writes the whole model."""

    def __init__(self, owner: nn.Module, *, only_in_checkpoints: bool = False):
        self.owner, self.names, self.added, self.active = owner, None, set(), True
        self.only_in_checkpoints = only_in_checkpoints
        self._recorded: Optional[tuple[list, torch.Tensor]] = None  # (names, their record), made once per set
        device = next((p.device for p in owner.parameters()), torch.device("cpu"))
        owner.register_buffer(RECORD_BUFFER, torch.empty(0, _ROW_BYTES, dtype=torch.uint8, device=device),
                              persistent=not only_in_checkpoints)
        self.refresh()

    def refresh(self) -> None:
        applies = not self.only_in_checkpoints or inside_trainer_checkpoint()
        names = left_out_names(self.owner) if applies else []
        if names == self.names:
            return
        keys = saved_key_variants(names)
        theirs = set(self.owner._keys_to_ignore_on_save or ()) - self.added
        self.added = keys - theirs
        self.owner._keys_to_ignore_on_save = theirs | keys
        device = self.owner._buffers[RECORD_BUFFER].device
        if names and (self._recorded is None or self._recorded[0] != names):
            # Made when the set changes (not at each checkpoint: a pass over the frozen weights), from the values,
            # not cached sums: a weight trained and frozen again may have changed without its version counter
            # knowing (fused AdamW, writes through .data).
            self._recorded = (names, record(self.owner, names))
        rows = self._recorded[1] if names else torch.empty(0, _ROW_BYTES, dtype=torch.uint8)
        self.owner._buffers[RECORD_BUFFER] = rows.to(device)
        if self.only_in_checkpoints:  # the record goes only into the checkpoints that leave weights out
            (self.owner._non_persistent_buffers_set.discard if names else
             self.owner._non_persistent_buffers_set.add)(RECORD_BUFFER)
        self.names = names

    def undo(self) -> None:
        if not self.active:
            return
        self.active = False
        if getattr(self.owner, _ACTIVE_ATTR, None) is self:
            delattr(self.owner, _ACTIVE_ATTR)
            if RECORD_BUFFER in self.owner._buffers:
                delattr(self.owner, RECORD_BUFFER)
        self.owner._keys_to_ignore_on_save = set(self.owner._keys_to_ignore_on_save or ()) - self.added


def leave_out(owner: nn.Module, *, only_in_checkpoints: bool = False) -> LeftOut:
    """From now until the returned object's ``undo``, ``owner.save_pretrained`` leaves out ``left_out_names`` and
    writes their record (``only_in_checkpoints``: only when Trainer writes a checkpoint). A model has one such
    state: an earlier one (another callback's) is undone first."""
    earlier = active_left_out(owner)
    if earlier is not None:
        earlier.undo()
    install_hooks(owner)
    left = LeftOut(owner, only_in_checkpoints=only_in_checkpoints)
    setattr(owner, _ACTIVE_ATTR, left)
    return left


def active_left_out(owner: nn.Module) -> Optional[LeftOut]:
    """The model's active ``LeftOut`` (a copy of a model, deep or pickled, has its own), or None."""
    return getattr(owner, _ACTIVE_ATTR, None)


def install_hooks(owner: nn.Module) -> None:
    """Install (once) the hooks: before a ``state_dict``, the active ``LeftOut``'s refresh; at a load, the check of
    a record, which then forgives the weights it stands for."""
    if getattr(owner, _HOOKED_ATTR, False):
        return
    owner.register_state_dict_pre_hook(_refresh_left_out)
    owner.register_load_state_dict_pre_hook(_check_record)
    owner.register_load_state_dict_post_hook(_forgive_left_out)
    setattr(owner, _HOOKED_ATTR, True)


# Module-level functions, not closures: a deepcopy of the model gets hooks that act on the copy.
def _refresh_left_out(module, prefix, keep_vars):
    left = active_left_out(module)
    if left is not None and left.active and left.owner is module:
        left.refresh()


def _check_record(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # Our own record buffer is never missing from a checkpoint that was saved without one.
    forgiven = {prefix + RECORD_BUFFER} if RECORD_BUFFER in module._buffers else set()
    saved = state_dict.pop(prefix + RECORD_BUFFER, None)  # load_state_dict hands the hooks its own copy
    if saved is not None:
        names = {_name_hash(name): name for name, _ in module.named_parameters(remove_duplicate=False)}
        rows = [bytes(row) for row in saved.to("cpu").reshape(-1, _ROW_BYTES).tolist()] \
            if saved.numel() % _ROW_BYTES == 0 else None
        unknown, differing = 0, []
        for row in rows or ():
            name = names.get(row[:_NAME_BYTES])
            if name is None:
                unknown += 1
            elif prefix + name not in state_dict:  # a weight the checkpoint holds needs no record
                if _same_weight(row, module.get_parameter(name)):
                    forgiven.add(prefix + name)
                else:
                    differing.append(name)
        if rows is None or unknown or differing:
            problem = (f"its frozen weight {differing[0]!r} differs from this model's (values, dtype or shape; a "
                       f"weight that from_pretrained initialised at random differs each time unless "
                       f"transformers.set_seed ran before it)" if differing else
                       f"{unknown} of the weights it left out are not in this model" if rows is not None else
                       f"its record {RECORD_BUFFER} has shape {tuple(saved.shape)}, not (n, {_ROW_BYTES})")
            error_msgs.append(f"this checkpoint was saved by QRLoraCheckpointCallback without the frozen weights, "
                              f"and {problem}: resume on the base model it was trained on, converted with the same "
                              f"config, or train with QRLoraCheckpointCallback(frozen_weights=True), whose "
                              f"checkpoints hold them")
            return
    if forgiven:
        setattr(module, _FORGIVEN_ATTR, getattr(module, _FORGIVEN_ATTR, set()) | forgiven)


def _forgive_left_out(module, incompatible_keys):
    forgiven = module.__dict__.pop(_FORGIVEN_ATTR, None)
    if forgiven:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in forgiven]
