"""``QRLoraCheckpointCallback``: Hugging Face ``Trainer`` checkpoints that hold what training changes, and the adapter.

A PEFT model's checkpoints are its adapter. Without this callback ours are the model's ``state_dict`` without the
bases (see ``skip_bases_in_hf_checkpoints``): the frozen base model again at every checkpoint. With it, while
``Trainer`` trains, they also leave out the frozen weights (what trains, not the model's size; resuming loads it
onto the same base model, and refuses, naming the parameter, a base whose left-out weights differ), and they
hold the adapter's two small files (``save_adapter``) in their ``qrlora-adapter`` folder, so a checkpoint can be
served or compared on a base model directly: ``load_adapter(base_model, "out/checkpoint-500")``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import CHECKPOINT_ADAPTER_FOLDER, _is_sharded, save_adapter
from .atomic_file import atomic_write_files
from .frozen_weights import LeftOut, active_left_out, leave_out
from .model import adapter_row, default_adapter_name, parameter_holding_wrapper, unwrap_model


class QRLoraCheckpointCallback(TrainerCallback):
    """Small ``Trainer`` checkpoints: what training changes, plus ``save_adapter``'s files in ``qrlora-adapter``.

    ``Trainer(..., callbacks=[QRLoraCheckpointCallback()])``. ``adapter_name``: the adapter to write when the model
    has several (checked when training begins); by default the one it trains (computes with: its only one, the
    one ``set_adapter`` chose, else the first loaded). Every process calls
    ``save_adapter`` (under FSDP2 gathering the shards is a collective) and those that write Trainer's checkpoints
    (``args.should_save``) write it. ``include_basis`` as in ``save_adapter``.

    ``frozen_weights=False`` (the default): Trainer's checkpoints leave out the frozen parameters of the model's
    backbone and LM head, and a ``qrlora_frozen_weights`` buffer records them; task heads outside the backbone,
    which transformers may have initialised at random, are kept (see ``frozen_weights``). Resuming refuses a base
    model whose left-out weights differ, naming the first; a parameter unfrozen during training is in the
    checkpoints from then on. Only Trainer's checkpoint writes leave them out (from ``train()``'s start to its end,
    only inside ``Trainer._save_checkpoint``): ``trainer.save_model()`` writes the whole model, also after a
    ``train()`` stopped by an exception or Ctrl-C (which never reaches ``on_train_end``; until
    ``callback.keep_frozen_weights()``, or ``keep_frozen_weights(copy)`` for a copy of the model made meanwhile,
    the model still carries the callback's hooks, inactive outside checkpoints). ``True`` keeps them in every
    checkpoint, as do FSDP and DeepSpeed (their own checkpoint formats) and models that are not a
    ``PreTrainedModel`` (a warning says so).

    When training ends, the final adapter also goes to ``output_dir/qrlora-adapter``, which ``trainer.push_to_hub()``
    uploads; with ``push_to_hub=True`` each push during training carries that folder too, and the checkpoint folders
    Trainer pushes carry theirs (both written just before the push), so ``load_adapter(base_model, repo_id)`` serves
    the Hub repository (not under FSDP2: a warning says so).

    Not covered: ``hyperparameter_search`` trials (their checkpoints live in folders of their own: skipped, with a
    warning) and FSDP1 (flattened parameters, which ``save_adapter`` refuses at the first checkpoint, after
    Trainer's own files are written).
    """

    def __init__(self, adapter_name: Optional[str] = None, include_basis: bool = False, frozen_weights: bool = False):
        self.adapter_name = adapter_name
        self.include_basis = include_basis
        self.frozen_weights = frozen_weights
        self._warned_trial = self._warned_whole = self._warned_push = False
        self._left_out: Optional[LeftOut] = None

    def _leave_out_frozen_weights(self, args, model: Optional[nn.Module]) -> None:
        """At the start of training (again, for another train()): what to leave out follows the frozen parameters
        from then on (``frozen_weights.LeftOut.refresh``)."""
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
        self._left_out = leave_out(owner, only_in_checkpoints=True)

    def keep_frozen_weights(self, model: Optional[nn.Module] = None) -> None:
        """Undo what this callback did to the model (done at the end of training; by hand after a ``train()`` that
        raised): ``save_pretrained`` writes the frozen weights again. ``model``: a copy of the model made while the
        callback was active (``deepcopy``, pickle), which carries the same state, to undo it there."""
        if model is not None:
            left = active_left_out(unwrap_model(model))
            if left is not None:
                left.undo()
            return
        if self._left_out is not None:
            self._left_out.undo()
            self._left_out = None

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
        if getattr(args, "push_to_hub", False) and not hasattr(TrainerCallback, "on_push_begin"):
            warnings.warn("QRLoraCheckpointCallback: this transformers has no on_push_begin event (transformers 4.x), "
                          "so Trainer's pushes during training go without the adapter; the final adapter is written "
                          "to output_dir/qrlora-adapter when training ends, which trainer.push_to_hub() then uploads",
                          UserWarning, stacklevel=2)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.keep_frozen_weights()  # trainer.save_model() after training writes the whole model
        if model is not None and not self._in_trial(state):  # the final adapter, which trainer.push_to_hub() uploads
            self._save_adapter_or_warn(model, os.path.join(args.output_dir, CHECKPOINT_ADAPTER_FOLDER),
                                       args.should_save)
        return control

    def _in_trial(self, state) -> bool:
        if getattr(state, "trial_name", None) is None and not getattr(state, "trial_params", None):
            return False
        if not self._warned_trial:
            warnings.warn("QRLoraCheckpointCallback does not write adapters for hyperparameter_search trials",
                          UserWarning, stacklevel=3)
            self._warned_trial = True
        return True

    def _save_adapter(self, model, folder, is_main_process: bool) -> dict[str, Path]:
        return save_adapter(model, folder, include_basis=self.include_basis, adapter_name=self._name(model),
                            is_main_process=is_main_process)

    def _save_adapter_or_warn(self, model, folder, is_main_process: bool) -> Optional[dict[str, Path]]:
        """For the writes beside Trainer's own (the end of training, a push): a model that cannot give its adapter
        then (merged and unloaded, merged layers, FSDP1's flattened parameters) is not an error of training."""
        try:
            return self._save_adapter(model, folder, is_main_process)
        except ValueError as err:
            warnings.warn(f"QRLoraCheckpointCallback: no adapter written to {folder}: {err}", UserWarning, stacklevel=3)
            return None

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._in_trial(state):
            return control
        self._save_adapter(model, self._checkpoint_adapter_folder(args, state), args.should_save)
        return control

    @staticmethod
    def _checkpoint_adapter_folder(args, state) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", CHECKPOINT_ADAPTER_FOLDER)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        # Trainer(push_to_hub=True) at each checkpoint, on the main process only, before it uploads output_dir (and
        # before on_save): the adapter as the model is now goes where that upload takes it.
        if model is None or self._in_trial(state):
            return control
        if any(map(_is_sharded, unwrap_model(model).parameters())):
            if not self._warned_push:
                warnings.warn("QRLoraCheckpointCallback: under FSDP2 the main process alone cannot gather the "
                              "adapter, so Trainer's pushes to the Hub go without it (push_adapter_to_hub, called on "
                              "every rank, uploads it)", UserWarning, stacklevel=2)
                self._warned_push = True
            return control
        # The output_dir upload, and the checkpoint's own (hub_strategy "checkpoint" / "all_checkpoints") when this
        # push is a checkpoint's: trainer.push_to_hub() and save_model() push too, with no checkpoint folder.
        written = self._save_adapter_or_warn(model, os.path.join(args.output_dir, CHECKPOINT_ADAPTER_FOLDER), True)
        checkpoint_adapter = Path(self._checkpoint_adapter_folder(args, state))
        if written is not None and checkpoint_adapter.parent.is_dir():
            # The same files, copied (not computed again), as one write like save_adapter's.
            atomic_write_files({checkpoint_adapter / path.name: path.read_bytes() for path in written.values()})
        return control
