"""``QRLoraCheckpointCallback``: Hugging Face ``Trainer`` checkpoints that also hold the QR-LoRA adapter.

A PEFT model's checkpoints are its adapter. Ours are the model's ``state_dict`` without the bases (see
``skip_bases_in_hf_checkpoints``), which is what ``resume_from_checkpoint`` needs; this callback adds the adapter's
two small files (``save_adapter``), so any checkpoint can be served or compared on a base model directly:
``load_adapter(base_model, "out/checkpoint-500")``.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import save_adapter


class QRLoraCheckpointCallback(TrainerCallback):
    """Write ``save_adapter``'s files into every checkpoint folder ``Trainer`` saves.

    ``Trainer(..., callbacks=[QRLoraCheckpointCallback()])``. Every process calls ``save_adapter`` (under FSDP2
    gathering the shards is a collective) and the main process writes. ``include_basis`` as in ``save_adapter``.
    Checkpoints of a ``hyperparameter_search`` trial, which live in a folder of their own, are not covered, and
    under FSDP1 (flattened parameters) ``save_adapter`` refuses at the first checkpoint (Trainer's own checkpoint
    is written by then): use FSDP2.
    """

    def __init__(self, include_basis: bool = False):
        self.include_basis = include_basis

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("QRLoraCheckpointCallback: the Trainer passed no model to on_save")
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, folder, include_basis=self.include_basis, is_main_process=state.is_world_process_zero)
        return control
