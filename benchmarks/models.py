"""Model level: one training step of a whole model, QR-LoRA vs PEFT LoRA vs full fine-tuning.

Models are built from ``transformers`` configurations with random weights (nothing is downloaded):

* ``roberta-base``    -- ``RobertaForSequenceClassification`` with roberta-base's configuration (12 layers,
  768 wide), 2 labels; the classifier head trains in every method (PEFT's and our ``modules_to_save``).
* ``llama-7b-blocks`` -- a stack of 2 Llama-7B decoder blocks (``LlamaModel``, 4096 wide, 11008 MLP), fed
  random embeddings (``inputs_embeds``), loss = mean square of the last hidden state.
* ``tiny-roberta`` / ``tiny-llama`` -- the same architectures at width 64, 2 layers: the CPU default.

Methods: ``full_ft`` (every parameter trains), ``peft_lora`` (LoRA on the attention query and value
projections, ``peft.get_peft_model``, ``lora_alpha = r``, no dropout), and ``qrlora`` at the same r and at the
rank tau = 0.9 gives on realistic spectra (~0.55 x width), both on the same projections via
``qrlora_kernels.apply_qrlora``, and ``qrlora_tau_q``: that rank with ``store_r=False`` (Q only). A step is ``zero_grad``, forward, loss, backward and an AdamW step over the
trainable parameters; parameters and optimizer states are in the benchmark dtype. Timed after two warm-up
steps (so the adapters are no longer at their zero initialisation, and the optimizer states exist): on a GPU
each method on its own with ``do_bench`` over a 1 s window; on the CPU the methods of one model round-robin,
one step each per round. Peak memory: ``torch.cuda.max_memory_allocated`` over one step on CUDA; not measured
on the CPU. ``state_mb``, on every device: the bytes of the model's parameters and buffers (weights, adapters,
QR-LoRA's bases), exact; the peak adds activations, gradients and optimizer states.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from .harness import Timing, measure
from .providers import peft_model

METHODS = ("full_ft", "peft_lora", "qrlora", "qrlora_tau", "qrlora_tau_q")
REALISTIC_RANK_FRACTION = 0.55


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str            # "roberta" or "llama"
    config: dict
    batch: int
    seq_len: int
    targets: tuple[str, ...]
    lora_rank: int = 16

    @property
    def width(self) -> int:
        return self.config["hidden_size"]


MODEL_PRESETS = {p.name: p for p in (
    ModelPreset("roberta-base", "roberta",
                dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=2),
                batch=8, seq_len=512, targets=("query", "value")),
    ModelPreset("llama-7b-blocks", "llama",
                dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
                batch=1, seq_len=4096, targets=("q_proj", "v_proj")),
    ModelPreset("tiny-roberta", "roberta",
                dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=130, type_vocab_size=1, num_labels=2),
                batch=4, seq_len=64, targets=("query", "value"), lora_rank=8),
    ModelPreset("tiny-llama", "llama",
                dict(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
                batch=4, seq_len=64, targets=("q_proj", "v_proj"), lora_rank=8),
)}
GPU_MODEL_PRESETS = ("roberta-base", "llama-7b-blocks")
CPU_MODEL_PRESETS = ("tiny-roberta", "tiny-llama")


def method_rank(preset: ModelPreset, method: str) -> Optional[int]:
    if method == "full_ft":
        return None
    if method in ("qrlora_tau", "qrlora_tau_q"):
        return max(1, round(REALISTIC_RANK_FRACTION * preset.width))
    return preset.lora_rank


def _base_model(preset: ModelPreset, device, dtype) -> nn.Module:
    import transformers
    # sdpa everywhere: the attention kernel is then the same for every method, only the linears differ.
    if preset.family == "roberta":
        config = transformers.RobertaConfig(**preset.config, attn_implementation="sdpa")
        cls = transformers.RobertaForSequenceClassification
    else:
        config = transformers.LlamaConfig(**preset.config, attn_implementation="sdpa")
        cls = transformers.LlamaModel
    with torch.device(device):
        model = cls(config)
    return model.to(dtype)


def build_model(preset: ModelPreset, method: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """The model for ``method`` with only that method's parameters trainable; returns (model, setup seconds)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    torch.manual_seed(seed)
    model = _base_model(preset, device, dtype)
    saved = ["classifier"] if preset.family == "roberta" else None
    start = time.perf_counter()
    if method == "peft_lora":
        import peft
        r = method_rank(preset, method)
        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(preset.targets),
                                 modules_to_save=saved)
        model = peft_model(model, config)
    elif method in ("qrlora", "qrlora_tau", "qrlora_tau_q"):
        from qrlora_kernels import QRLoraConfig, apply_qrlora
        apply_qrlora(model, QRLoraConfig(target_modules=list(preset.targets), rank=method_rank(preset, method),
                                         modules_to_save=saved, store_r=method != "qrlora_tau_q"), progress=False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return model.train(), time.perf_counter() - start


def make_batch(preset: ModelPreset, *, device="cpu", dtype=torch.float32, seed: int = 1) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (preset.batch, preset.seq_len)
    if preset.family == "roberta":
        # Ids from 3 up: 0-2 are RoBERTa's special tokens (1 is padding, which would mask positions).
        ids = torch.randint(3, preset.config["vocab_size"], shape, generator=gen, device=device)
        labels = torch.randint(0, preset.config["num_labels"], (preset.batch,), generator=gen, device=device)
        return {"input_ids": ids, "labels": labels}
    embeds = torch.randn(*shape, preset.width, generator=gen, device=device, dtype=dtype)
    return {"inputs_embeds": embeds}


def _loss(preset: ModelPreset, model: nn.Module, batch: dict) -> torch.Tensor:
    if preset.family == "roberta":
        return model(**batch).loss
    return model(inputs_embeds=batch["inputs_embeds"]).last_hidden_state.float().square().mean()


def make_train_step(preset: ModelPreset, model: nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{preset.name}: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(preset, model, batch)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _prepare(preset: ModelPreset, method: str, device, dtype):
    model, setup_s = build_model(preset, method, device=device, dtype=dtype)
    batch = make_batch(preset, device=device, dtype=dtype)
    step = make_train_step(preset, model, batch)
    for _ in range(2):
        step()
    return model, step, setup_s


def _row(preset: ModelPreset, method: str, model, dtype, timing: Timing, peak_mb, setup_s) -> dict:
    tokens = preset.batch * preset.seq_len
    return {
        "model": preset.name, "method": method, "rank": method_rank(preset, method),
        "dtype": str(dtype).replace("torch.", ""), "batch": preset.batch, "seq_len": preset.seq_len,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "reps": timing.reps,
        "tokens_per_s": tokens / (timing.median_ms * 1e-3), "peak_mem_mb": peak_mb,
        "state_mb": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20,
        "setup_s": setup_s,
        "status": "ok", "note": "",
    }


def _error_row(preset: ModelPreset, method: str, exc: BaseException) -> dict:
    return {"model": preset.name, "method": method, "rank": method_rank(preset, method), "status": "error",
            "note": f"{type(exc).__name__}: {exc}"[:300]}


def run_model_cuda(preset: ModelPreset, method: str, *, device="cuda", dtype=torch.bfloat16) -> dict:
    """One row on a GPU, the method on its own: do_bench over a 1 s window, and the peak memory of a step."""
    model, step, setup_s = _prepare(preset, method, device, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    timing = measure(step, device=device, rep_ms=1000.0)
    row = _row(preset, method, model, dtype, timing, peak_mb, setup_s)
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_models_cpu_interleaved(preset: ModelPreset, methods, *, dtype=torch.float32, rounds: int = 5) -> list[dict]:
    """CPU: every method's step once per round, round-robin, so that load from other processes on a shared
    machine falls on all of them alike (the models are small enough to hold together)."""
    prepared, rows = {}, {}
    for method in methods:
        try:
            prepared[method] = _prepare(preset, method, "cpu", dtype)
        except Exception as exc:
            rows[method] = _error_row(preset, method, exc)
    times = {m: [] for m in prepared}
    for _ in range(rounds):
        for method, (_, step, _) in prepared.items():
            times[method].append(measure(step, warmup=0, reps=1).median_ms)
    for method, (model, _, setup_s) in prepared.items():
        ts = sorted(times[method])
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else ts * 4
        rows[method] = _row(preset, method, model, dtype, Timing(statistics.median(ts), q[0], q[3], len(ts)),
                            None, setup_s)
    return [rows[m] for m in methods]


def run_models(preset_names, *, device="cpu", dtype=torch.float32, methods=METHODS, progress=None,
               rounds: int = 5) -> list[dict]:
    """Rows for every (preset, method); a failing method gives a row with status "error", not a crash.
    ``speedup_vs_full_ft``: full fine-tuning's step time over the method's, same run."""
    for name in preset_names:
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {METHODS}")
    cuda = torch.device(device).type == "cuda"
    rows = []
    for name in preset_names:
        preset = MODEL_PRESETS[name]
        if not cuda:
            rows += run_models_cpu_interleaved(preset, methods, dtype=dtype, rounds=rounds)
            if progress is not None:
                progress.update(len(methods))
            continue
        for method in methods:
            try:
                rows.append(run_model_cuda(preset, method, device=device, dtype=dtype))
            except Exception as exc:  # an OOM or a missing piece must not lose the other rows
                rows.append(_error_row(preset, method, exc))
                del exc
                gc.collect()
                torch.cuda.empty_cache()
            if progress is not None:
                progress.update(1)
    full = {r["model"]: r for r in rows if r["method"] == "full_ft" and r["status"] == "ok"}
    for r in rows:
        base = full.get(r["model"])
        r["speedup_vs_full_ft"] = (base["median_ms"] / r["median_ms"]) if base and r["status"] == "ok" else None
    return rows
