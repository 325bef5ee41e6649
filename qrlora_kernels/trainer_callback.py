"""``QRLoraCheckpointCallback``: Hugging Face ``Trainer`` checkpoints that hold what training changes, and the adapter.

A PEFT model's checkpoints are its adapter. Without this callback ours are the model's ``state_dict`` without the
bases (see ``skip_bases_in_hf_checkpoints``): the frozen base model again at every checkpoint. With it, while
``Trainer`` trains, they also leave out the frozen weights (what trains, not the model's size; resuming loads it
onto the same base model, and refuses, naming the parameter, a base whose left-out weights differ), and they
hold the adapter's two small files (``save_adapter``) in their ``qrlora-adapter`` folder, so a checkpoint can be
served or compared on a base model directly: ``load_adapter(base_model, "out/checkpoint-500")``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import CHECKPOINT_ADAPTER_FOLDER, _is_sharded, sample_hash, save_adapter
from .config import TASK_HEADS
from .model import adapter_row, default_adapter_name, parameter_holding_wrapper, saved_key_variants, unwrap_model

# The buffer that carries the left-out weights' identities in a checkpoint (one 16-byte row per weight).
FROZEN_WEIGHTS_BUFFER = "qrlora_frozen_weights"
# Heads that transformers initialises at random when a base checkpoint lacks them: kept in checkpoints even frozen.
_FRESH_HEADS = frozenset(head for heads in TASK_HEADS.values() for head in heads)


class _FrozenWeightsLeftOut:
    """Leaves ``owner``'s frozen parameters out of its Hugging Face checkpoints until ``undo``: their names go in
    ``_keys_to_ignore_on_save``, a buffer records what they were, and when a ``state_dict`` is loaded a pre-hook
    refuses one whose record differs (naming the first such weight) and a post-hook stops counting them missing."""

    def __init__(self, owner: PreTrainedModel):
        self.owner = owner
        self.names = sorted(name for name, p in owner.named_parameters(remove_duplicate=False)
                            if not p.requires_grad and name.split(".", 1)[0] not in _FRESH_HEADS)
        digests = [hashlib.blake2b(name.encode() + sample_hash(owner.get_parameter(name)), digest_size=16).digest()
                   for name in self.names]
        record = torch.tensor([list(d) for d in digests], dtype=torch.uint8).reshape(len(digests), 16)
        device = next((p.device for p in owner.parameters()), torch.device("cpu"))
        owner.register_buffer(FROZEN_WEIGHTS_BUFFER, record.to(device), persistent=True)
        self.keys = saved_key_variants(self.names)
        before = set(owner._keys_to_ignore_on_save or ())
        self.added = self.keys - before
        owner._keys_to_ignore_on_save = before | self.keys
        self.not_missing = self.keys | saved_key_variants([FROZEN_WEIGHTS_BUFFER])
        self.hooks = [owner.register_load_state_dict_pre_hook(self._check),
                      owner.register_load_state_dict_post_hook(self._not_missing)]

    def _check(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = state_dict.pop(prefix + FROZEN_WEIGHTS_BUFFER, None)  # load_state_dict hands us its own copy
        if saved is None:
            return  # a checkpoint that holds its frozen weights (or predates this record)
        ours = getattr(module, FROZEN_WEIGHTS_BUFFER)
        if saved.shape == ours.shape and torch.equal(saved.to(ours.device), ours):
            return
        if saved.shape != ours.shape:
            problem = (f"it was trained with {saved.shape[0]} frozen weights left out of its checkpoints, this model "
                       f"has {ours.shape[0]}")
        else:
            row = int((saved.to(ours.device) != ours).any(dim=1).nonzero()[0])
            problem = (f"its frozen weight {self.names[row]!r} differs from this model's (values, dtype or shape; a "
                       f"weight that from_pretrained initialised at random differs each time unless "
                       f"transformers.set_seed ran before it)")
        error_msgs.append(f"this checkpoint was saved by QRLoraCheckpointCallback without the frozen weights, and "
                          f"{problem}: resume on the base model it was trained on, or train with "
                          f"QRLoraCheckpointCallback(frozen_weights=True), whose checkpoints hold them")

    def _not_missing(self, module, incompatible_keys):
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in self.not_missing]

    def undo(self) -> None:
        for hook in self.hooks:
            hook.remove()
        delattr(self.owner, FROZEN_WEIGHTS_BUFFER)
        self.owner._keys_to_ignore_on_save = set(self.owner._keys_to_ignore_on_save or ()) - self.added


class QRLoraCheckpointCallback(TrainerCallback):
    """Small ``Trainer`` checkpoints: what training changes, plus ``save_adapter``'s files in ``qrlora-adapter``.

    ``Trainer(..., callbacks=[QRLoraCheckpointCallback()])``. ``adapter_name``: the adapter to write when the model
    has several (checked when training begins); by default its only one, or "default". Every process calls
    ``save_adapter`` (under FSDP2 gathering the shards is a collective) and those that write Trainer's checkpoints
    (``args.should_save``) write it. ``include_basis`` as in ``save_adapter``.

    ``frozen_weights=False`` (the default): from the moment the ``Trainer`` is built until training ends, the model's
    frozen parameters are left out of what ``save_pretrained`` writes (so of Trainer's checkpoints, not of
    ``trainer.save_model()`` after training), except the task heads (``classifier``, ``score``, ``qa_outputs``), which
    transformers may have initialised at random. A ``qrlora_frozen_weights`` buffer in the checkpoint records them,
    and resuming refuses a base model whose left-out weights differ. ``True`` keeps them in every checkpoint, as do
    FSDP and DeepSpeed (their own checkpoint formats) and models that are not a ``PreTrainedModel`` (a warning says
    so). A ``train()`` that stops with an exception never reaches ``on_train_end``: the model then still leaves the
    frozen weights out of ``save_pretrained`` until ``callback.keep_frozen_weights()``.

    When training ends, the final adapter also goes to ``output_dir/qrlora-adapter``, which ``trainer.push_to_hub()``
    uploads; with ``push_to_hub=True`` each push during training carries that folder too (written just before it), so
    ``load_adapter(base_model, repo_id)`` serves the Hub repository (not under FSDP2: a warning says so).

    Not covered: ``hyperparameter_search`` trials (their checkpoints live in folders of their own: skipped, with a
    warning) and FSDP1 (flattened parameters, which ``save_adapter`` refuses at the first checkpoint, after
    Trainer's own files are written).
    """

    def __init__(self, adapter_name: Optional[str] = None, include_basis: bool = False, frozen_weights: bool = False):
        self.adapter_name = adapter_name
        self.include_basis = include_basis
        self.frozen_weights = frozen_weights
        self._warned_trial = self._warned_whole = self._warned_push = False
        self._left_out: Optional[_FrozenWeightsLeftOut] = None

    def _leave_out_frozen_weights(self, args, model: Optional[nn.Module]) -> None:
        """(Again) from the model's parameters as they are now: which are frozen may have changed since."""
        self.keep_frozen_weights()
        if self.frozen_weights or model is None:
            return
        owner = unwrap_model(model)
        why = None
        engine = getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)
        if engine or any(map(_is_sharded, owner.parameters())) \
                or parameter_holding_wrapper(model) == "FullyShardedDataParallel":
            why = "under FSDP or DeepSpeed Trainer writes checkpoints in their own formats"
        elif not isinstance(owner, PreTrainedModel):
            why = f"Trainer saves a {type(owner).__name__}, not a transformers PreTrainedModel, whole"
        if why is not None:
            if not self._warned_whole:
                warnings.warn(f"QRLoraCheckpointCallback: {why}: its checkpoints keep the frozen weights",
                              UserWarning, stacklevel=3)
                self._warned_whole = True
            return
        self._left_out = _FrozenWeightsLeftOut(owner)

    def keep_frozen_weights(self) -> None:
        """Undo what this callback did to the model (at the end of training; by hand after a ``train()`` that
        raised): ``save_pretrained`` writes the frozen weights again."""
        if self._left_out is not None:
            self._left_out.undo()
            self._left_out = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Before train(resume_from_checkpoint=...) loads a checkpoint, which happens before on_train_begin.
        self._leave_out_frozen_weights(args, model)
        return control

    def _name(self, model) -> str:
        return self.adapter_name if self.adapter_name is not None else default_adapter_name(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("QRLoraCheckpointCallback: the Trainer passed no model")
        try:
            adapter_row(model, self._name(model))  # before any training, not at the first checkpoint
        except ValueError as err:
            raise ValueError(f"QRLoraCheckpointCallback: {err}; pass adapter_name= to choose the one to write") \
                from None
        self._leave_out_frozen_weights(args, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.keep_frozen_weights()  # trainer.save_model() after training writes the whole model
        if model is not None and not self._in_trial(state):  # the final adapter, which trainer.push_to_hub() uploads
            self._save_adapter(model, os.path.join(args.output_dir, CHECKPOINT_ADAPTER_FOLDER), args.should_save)
        return control

    def _in_trial(self, state) -> bool:
        if getattr(state, "trial_name", None) is None and not getattr(state, "trial_params", None):
            return False
        if not self._warned_trial:
            warnings.warn("QRLoraCheckpointCallback does not write adapters for hyperparameter_search trials",
                          UserWarning, stacklevel=3)
            self._warned_trial = True
        return True

    def _save_adapter(self, model, folder, is_main_process: bool) -> None:
        save_adapter(model, folder, include_basis=self.include_basis, adapter_name=self._name(model),
                     is_main_process=is_main_process)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._in_trial(state):
            return control
        self._save_adapter(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                                               CHECKPOINT_ADAPTER_FOLDER), args.should_save)
        return control

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        # Trainer(push_to_hub=True) at each checkpoint, on the main process only, before it uploads output_dir (and
        # before on_save): the adapter as the model is now goes where that upload takes it.
        if model is None or self._in_trial(state):
            return control
        if any(map(_is_sharded, unwrap_model(model).parameters())):
            if not self._warned_push:
                warnings.warn("QRLoraCheckpointCallback: under FSDP2 the main process alone cannot gather the adapter, "
                              "so Trainer's pushes to the Hub go without it (push_adapter_to_hub, called on every rank, "
                              "uploads it)", UserWarning, stacklevel=2)
                self._warned_push = True
            return control
        self._save_adapter(model, os.path.join(args.output_dir, CHECKPOINT_ADAPTER_FOLDER), True)
        return control
