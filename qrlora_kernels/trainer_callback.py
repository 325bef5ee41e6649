"""``QRLoraCheckpointCallback``: Hugging Face ``Trainer`` checkpoints that also hold the QR-LoRA adapter.

A PEFT model's checkpoints are its adapter. Ours are the model's ``state_dict`` without the bases (see
``skip_bases_in_hf_checkpoints``), which is what ``resume_from_checkpoint`` needs; this callback adds the adapter's
two small files (``save_adapter``) in the checkpoint's ``qrlora-adapter`` folder, so a checkpoint can be served or
compared on a base model directly: ``load_adapter(base_model, "out/checkpoint-500")``.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import CHECKPOINT_ADAPTER_FOLDER, save_adapter
from .model import adapter_row, default_adapter_name


class QRLoraCheckpointCallback(TrainerCallback):
    """Write ``save_adapter``'s files into every checkpoint ``Trainer`` saves, in its ``qrlora-adapter`` folder.

    ``Trainer(..., callbacks=[QRLoraCheckpointCallback()])``. ``adapter_name``: the adapter to write when the model
    has several (checked when training begins); by default its only one, or "default". Every process calls
    ``save_adapter`` (under FSDP2 gathering the shards is a collective) and those that write Trainer's checkpoints
    (``args.should_save``) write it. ``include_basis`` as in ``save_adapter``.

    Not covered: ``hyperparameter_search`` trials (their checkpoints live in folders of their own: skipped, with a
    warning), checkpoints that Trainer pushes to the Hub (it uploads before callbacks run), and FSDP1 (flattened
    parameters, which ``save_adapter`` refuses at the first checkpoint, after Trainer's own files are written).
    """

    def __init__(self, adapter_name: Optional[str] = None, include_basis: bool = False):
        self.adapter_name = adapter_name
        self.include_basis = include_basis
        self._warned_trial = False

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
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if getattr(state, "trial_name", None) is not None or getattr(state, "trial_params", None):
            if not self._warned_trial:
                warnings.warn("QRLoraCheckpointCallback does not write adapters for hyperparameter_search trials",
                              UserWarning, stacklevel=2)
                self._warned_trial = True
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                              CHECKPOINT_ADAPTER_FOLDER)
        save_adapter(model, folder, include_basis=self.include_basis, adapter_name=self._name(model),
                     is_main_process=args.should_save)
        return control
