"""``python -m benchmarks.throughput``: what one training step of a linear layer costs with full fine-tuning,
PEFT's LoRA and QR-LoRA, measured side by side in one run.

* With no arguments on a GPU: the full suite (presets roberta-base, llama-7b, llama-70b; T in 512..16384;
  r in 16, 64, 256 and the rank tau = 0.9 gives on realistic spectra, ~0.55 x min dim; bf16; fwd and fwd+bwd),
  plus the model level and the QR initialisation, written to ``benchmarks/results/<gpu>/``.
* With no arguments on a CPU-only machine: a small CPU default (one roberta-base shape, fp32, torch paths
  only; the Triton path would run in Triton's interpreter, far too slow to time) that finishes in about a
  minute, written to ``benchmarks/results/cpu-default/``. It says so when it starts.

Writes ``throughput.{json,csv,png}`` (layer level), ``models.{json,csv}`` (model level) and ``qr.{json,csv}``
(QR initialisation, through ``benchmarks.qr``), each tagged with ``harness.environment()``. The providers,
the flop counts and the input handling are documented in ``benchmarks/providers.py``; the model level in
``benchmarks/models.py``.

``--case`` runs a single case for a few iterations with NVTX ranges and no timing, for Nsight
(``benchmarks/profile.sh``).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from qrlora_kernels.atomic_file import check_writable_folder

from . import providers as P
from .harness import RESULTS_DIR, Timing, environment, format_table, measure, write_results

LAYER_PRESETS = {
    # out x in of every linear of one transformer block (q/k/v/o share a shape).
    "roberta-base": [(768, 768), (3072, 768), (768, 3072)],
    "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama-70b": [(8192, 8192), (28672, 8192), (8192, 28672), (1024, 8192)],
    # roberta-base's attention projection only: the CPU default and part of the quick GPU set.
    "roberta-attn": [(768, 768)],
}
GPU_DEFAULT = dict(presets=["roberta-base", "llama-7b", "llama-70b"], tokens=[512, 2048, 8192, 16384],
                   ranks=["16", "64", "256", "tau"], dtype="bf16", modes=list(P.MODES),
                   providers=["full_ft", "frozen_linear", "peft_lora", "qrlora_torch", "qrlora_triton",
                              "qrlora_triton_lowrank", "qrlora_triton_merged", "qrlora_triton_q"],
                   model_presets=["roberta-base", "llama-7b-blocks"])
# The quick GPU set (the device suite's): roberta-base's attention projection and every llama-7b shape.
GPU_QUICK = dict(GPU_DEFAULT, presets=["roberta-attn", "llama-7b"], tokens=[2048, 8192], ranks=["16", "tau"],
                 model_presets=["roberta-base"])
CPU_DEFAULT = dict(presets=["roberta-attn"], tokens=[128, 512], ranks=["16", "tau"], dtype="fp32",
                   modes=list(P.MODES),
                   providers=["full_ft", "frozen_linear", "peft_lora", "qrlora_torch", "qrlora_torch_lowrank",
                              "qrlora_torch_merged", "qrlora_torch_q"],
                   model_presets=["tiny-roberta", "tiny-llama"])
TAU_RANK_FRACTION = 0.55
QR_SIZES_CPU = [(512, 512)]
QR_SIZES_GPU = [(4096, 4096), (4096, 11008)]


# ------------------------------------------------------------------------------------------ options

def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of positive ints, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of positive ints, got {text!r}")
    return values


def _rank_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v != "tau" and not (v.isdigit() and int(v) > 0)]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"ranks must be positive ints or 'tau' (~{TAU_RANK_FRACTION} x min dim), "
                                         f"comma-separated; got {text!r}")
    return values


def _choice_list(choices, what):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
        return values
    return parse


def _shape_list(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not found or min(int(found.group(1)), int(found.group(2))) < 1:
            raise argparse.ArgumentTypeError(f"shapes are OUTxIN, comma-separated (e.g. 4096x11008), got {item!r}")
        shapes.append((int(found.group(1)), int(found.group(2))))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    def describe(plan):
        return (f"presets {', '.join(plan['presets'])}; T {', '.join(map(str, plan['tokens']))}; "
                f"ranks {', '.join(plan['ranks'])}; {plan['dtype']}; modes {', '.join(plan['modes'])}; "
                f"providers {', '.join(plan['providers'])}; models {', '.join(plan['model_presets'])}")
    presets = "\n".join(f"  {k:13s} {', '.join(f'{n}x{m}' for n, m in v)}" for k, v in LAYER_PRESETS.items())
    provider_lines = "\n".join(f"  {p.name:22s} {p.description}" for p in P.PROVIDERS.values())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Layer- and model-level throughput of full fine-tuning, PEFT LoRA and QR-LoRA, side by side.\n"
                    "No arguments: the full suite on a GPU, a small CPU default (about a minute) otherwise.\n"
                    "Options override the default of the machine's kind.",
        epilog=f"layer presets (out x in):\n{presets}\n\nproviders:\n{provider_lines}\n\n"
               f"defaults:\n  GPU:       {describe(GPU_DEFAULT)}\n  GPU quick: {describe(GPU_QUICK)}\n"
               f"  CPU:       {describe(CPU_DEFAULT)}\n\n"
               "example:\n  python -m benchmarks.throughput --preset llama-7b --tokens 2048,8192 --ranks 16,tau "
               "--dtype bf16 --modes fwd+bwd",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", dest="presets", type=_choice_list(list(LAYER_PRESETS), "preset"),
                        help=f"layer shape presets, comma-separated: {', '.join(LAYER_PRESETS)}")
    parser.add_argument("--shapes", type=_shape_list, help="extra layer shapes OUTxIN, comma-separated")
    parser.add_argument("--multi-shapes", type=_shape_list, default=None,
                        help="the shapes OUTxIN on which the multi-adapter providers (qrlora_*_multi"
                             f"{P.MULTI_ADAPTERS}) run (default: every shape)")
    parser.add_argument("--tokens", type=lambda t: _int_list(t, "tokens"), help="token counts T, comma-separated")
    parser.add_argument("--ranks", type=_rank_list, help="ranks, comma-separated; 'tau' = ~0.55 x min(out, in)")
    parser.add_argument("--dtype", choices=list(P.DTYPES), help="bf16 (GPU default), fp16, fp32 (CPU default)")
    parser.add_argument("--modes", type=_choice_list(list(P.MODES), "mode"), help="fwd, fwd+bwd")
    parser.add_argument("--providers", type=_choice_list(list(P.PROVIDERS), "provider"),
                        help=f"providers, comma-separated: {', '.join(P.PROVIDERS)}")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=lambda t: _int_list(t, "threads")[0], default=None,
                        help="CPU threads for torch (default: 1 for the CPU default, torch's own otherwise: on a "
                             "shared machine, threads waiting for descheduled siblings swamp small timings)")
    parser.add_argument("--quick", action="store_true",
                        help="GPU: a short subset (768x768 and the llama-7b shapes, T 2048/8192, r 16/tau); "
                             "CPU: the CPU default")
    parser.add_argument("--model-level", choices=["auto", "on", "off"], default="auto",
                        help="model-level training steps (auto: part of the default runs, tiny models on the CPU default, "
                             "and whenever --model-presets is given)")
    parser.add_argument("--model-presets", type=_choice_list(["roberta-base", "llama-7b-blocks", "tiny-roberta",
                                                              "tiny-llama"], "model preset"),
                        help="model-level presets, comma-separated")
    parser.add_argument("--no-qr", action="store_true", help="skip the QR initialisation section")
    parser.add_argument("--qr-sizes", type=_shape_list, default=None,
                        help="QR section matrix sizes MxN, comma-separated (default: 4096x4096,4096x11008 on a GPU, "
                             "512x512 on the CPU)")
    parser.add_argument("--only", choices=["layers", "models", "qr"], default=None,
                        help="run one section only (layer level, model level, or QR initialisation)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time layer cases with CUDA graphs (removes launch overhead; inputs then no longer "
                             "rotate, the graph replays on fixed buffers)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; layer cases not started by then are reported as not run")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/cpu-default/ for the CPU default, "
                             "benchmarks/results/<gpu>/ on a GPU, benchmarks/results/cpu/ otherwise)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--summary", type=Path, default=None, metavar="DIR",
                        help="print a short summary table of the results in DIR and exit")
    parser.add_argument("--case", default=None,
                        help="profile one case: 'shape=4096x4096,tokens=2048,rank=64,provider=qrlora_triton,"
                             "mode=fwd+bwd[,dtype=bf16][,iters=20]': runs it with NVTX ranges inside a "
                             "cudaProfilerStart/Stop window, no timing (see benchmarks/profile.sh)")
    return parser


def resolve_plan(args, *, cuda: bool) -> dict:
    """The run's settings: the GPU or CPU default, overridden by whatever was given."""
    explicit = any(getattr(args, k) is not None for k in ("presets", "shapes", "tokens", "ranks", "dtype", "modes",
                                                          "providers"))
    if cuda:
        base = GPU_QUICK if args.quick else GPU_DEFAULT
    else:
        base = CPU_DEFAULT
    plan = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()
            if k != "model_presets"}
    plan["model_presets"] = args.model_presets or base["model_presets"]
    plan["shapes"] = [s for name in plan["presets"] for s in LAYER_PRESETS[name]] + (args.shapes or [])
    if args.shapes and args.presets is None:
        plan["shapes"] = list(args.shapes)
    plan["suite"] = ("gpu-quick" if args.quick else "gpu") if cuda else ("cpu-default" if not explicit else "cpu")
    plan["multi_shapes"] = getattr(args, "multi_shapes", None)
    return plan


def _resolve_rank(token: str, n: int, k: int) -> Optional[int]:
    r = max(1, round(TAU_RANK_FRACTION * min(n, k))) if token == "tau" else int(token)
    return r if r <= min(n, k) else None


# ------------------------------------------------------------------------------------------ measuring

def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _peak_memory_mb(provider, case) -> Optional[float]:
    """Peak allocated memory of one step, from an empty allocator: weights, one input set, activations,
    gradients and workspaces. CUDA only (torch has no CPU allocator statistics).

    One untimed step runs first, before the peak is reset: a new autotune key's first launch allocates the
    autotuner's L2-flush buffer (256 MB) and ``restore_value`` clones, which are not the step's memory."""
    if torch.device(case.device).type != "cuda":
        return None
    _free(case.device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(case.device)
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, 1)
    step = P.make_step(module, case, xs, dys)
    step()  # compile / autotune outside the measured window (its result is dropped at once)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(case.device)
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(case.device) - base
    del module, xs, dys, step
    _free(case.device)
    return peak / 2**20


def _row_result(provider, case, timing, peak) -> dict:
    strategy = P.chosen_strategy(provider, case)
    work = P.flops(provider, case, strategy)
    return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "reps": timing.reps,
            "strategy": strategy, "gflop": work / 1e9, "tflops": work / (timing.median_ms * 1e-3) / 1e12,
            "peak_mem_mb": peak, "input_buffers": P.buffer_count(case)}


def measure_case(provider, case, *, cuda_graph: bool = False) -> dict:
    """One row: timing, TFLOP/s and peak memory of ``provider`` on ``case``, timed on its own."""
    peak = _peak_memory_mb(provider, case)
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, P.buffer_count(case))
    step = P.make_step(module, case, xs, dys)
    timing = measure(step, device=case.device, warmup=2, reps=5, min_time_s=0.15, cuda_graph=cuda_graph)
    del module, xs, dys, step
    _free(case.device)
    return _row_result(provider, case, timing, peak)


CPU_ROUNDS = 7


class Failure(str):
    """A case's error message. Kept instead of the exception: its traceback would pin the case's tensors
    (on a GPU, gigabytes) for the rest of the run."""

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        return cls(f"{type(exc).__name__}: {exc}"[:300])


def measure_interleaved(pairs, *, rounds: int = CPU_ROUNDS) -> list:
    """CPU: time a group of (provider, case) pairs round-robin, one call each per round, so that load from
    other processes on a shared machine falls on every provider alike. Returns a result dict or the
    ``Failure`` per pair."""
    steps, results = [], [None] * len(pairs)
    for i, (provider, case) in enumerate(pairs):
        try:
            module = P.build_module(provider, case)
            xs, dys = P.make_inputs(case, P.buffer_count(case))
            step = P.make_step(module, case, xs, dys)
            step()
            step()
            steps.append((i, step))
        except Exception as exc:
            results[i] = Failure.of(exc)
    times = {i: [] for i, _ in steps}
    for _ in range(rounds):
        for i, step in steps:
            if isinstance(results[i], Failure):
                continue
            try:
                times[i].append(measure(step, device="cpu", warmup=0, reps=1).median_ms)
            except Exception as exc:
                results[i] = Failure.of(exc)
    for i, _ in steps:
        if not isinstance(results[i], Failure):
            ts = sorted(times[i])
            q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else ts * 4
            timing = Timing(statistics.median(ts), q[0], q[3], reps=len(ts))
            results[i] = _row_result(*pairs[i], timing, None)
    return results


def plan_cases(plan: dict, device: str) -> list[tuple]:
    """(provider, case) pairs in run order; rank-independent providers once per (shape, T, mode)."""
    dtype = P.DTYPES[plan["dtype"]]
    pairs = []
    for n, k in plan["shapes"]:
        ranks = []
        for token in plan["ranks"]:
            r = _resolve_rank(token, n, k)
            if r is not None and r not in ranks:
                ranks.append(r)
        if not ranks:
            continue
        for tokens in plan["tokens"]:
            for mode in plan["modes"]:
                for name in plan["providers"]:
                    provider = P.PROVIDERS[name]
                    if provider.num_adapters > 1 and plan.get("multi_shapes") and (n, k) not in plan["multi_shapes"]:
                        continue
                    for r in (ranks if provider.uses_rank else [ranks[0]]):
                        pairs.append((provider, P.Case(n, k, tokens, r, dtype, mode, device)))
    return pairs


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or nothing where tqdm is missing (the bare GPU image) or output is not a terminal."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="case", disable=not enabled, leave=False)


def _base_row(provider, case) -> dict:
    backend = provider.backend or "torch"
    if backend == "triton" and torch.device(case.device).type != "cuda":
        backend = "triton-interpreter"  # asked for with TRITON_INTERPRET=1: a correctness run, not a speed
    return {"provider": provider.name, "backend": backend, "shape": case.shape,
            "out_features": case.out_features, "in_features": case.in_features, "tokens": case.tokens,
            "rank": case.rank if provider.uses_rank else None, "dtype": str(case.dtype).replace("torch.", ""),
            "mode": case.mode}


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_frozen and ratio_vs_peft: time over the frozen linear's (same shape, T, dtype, mode) and over
    PEFT LoRA's (same, at equal r), both measured in the same run."""
    def key(r, with_rank):
        return (r["shape"], r["tokens"], r["dtype"], r["mode"]) + ((r["rank"],) if with_rank else ())
    ok = [r for r in rows if r.get("status") == "ok"]
    frozen = {key(r, False): r["median_ms"] for r in ok if r["provider"] == "frozen_linear"}
    peft = {key(r, True): r["median_ms"] for r in ok if r["provider"] == "peft_lora"}
    for r in rows:
        r["ratio_vs_frozen"] = r["ratio_vs_peft"] = None
        if r.get("status") != "ok":
            continue
        if key(r, False) in frozen:
            r["ratio_vs_frozen"] = r["median_ms"] / frozen[key(r, False)]
        if r["rank"] is not None and key(r, True) in peft:
            r["ratio_vs_peft"] = r["median_ms"] / peft[key(r, True)]
    # Multi-adapter rows: time over the single-adapter layer's on the same backend (the dispatcher's strategy,
    # what one adapter runs) and over its forced-lowrank twin (what a multi-adapter batch always runs).
    timed = {(r["provider"],) + key(r, True): r["median_ms"] for r in ok}
    for r in rows:
        provider = P.PROVIDERS.get(r["provider"])
        if provider is None or provider.num_adapters == 1:
            continue
        r["ratio_vs_single"] = r["ratio_vs_single_lowrank"] = None
        if r.get("status") != "ok":
            continue
        single = timed.get((f"qrlora_{provider.backend}",) + key(r, True))
        lowrank = timed.get((f"qrlora_{provider.backend}_lowrank",) + key(r, True))
        r["ratio_vs_single"] = r["median_ms"] / single if single else None
        r["ratio_vs_single_lowrank"] = r["median_ms"] / lowrank if lowrank else None


def run_layers(plan: dict, device: str, *, cuda_graph=False, time_budget=None, progress=True,
               on_rows=None) -> tuple[list, dict]:
    """Rows for every planned case, and the providers that were not timed, with the reason.

    CUDA: each case on its own with ``harness.measure`` (do_bench); the time budget is checked before every
    case. CPU: the providers of one (shape, T, mode) group interleaved round-robin (``measure_interleaved``),
    the budget checked per group. ``on_rows(rows, not_timed)`` (ratios filled in) is called after every
    group, so that the caller can write the results as they come."""
    not_timed: dict = {}
    pairs = [(p, c) for p, c in plan_cases(plan, device) if unavailable_reason_cached(p, device, not_timed) is None]
    groups: dict = {}
    for provider, case in pairs:
        groups.setdefault((case.shape, case.tokens, case.mode), []).append((provider, case))
    cuda = torch.device(device).type == "cuda"
    rows = []
    start = time.perf_counter()

    def over_budget():
        return time_budget is not None and time.perf_counter() - start > time_budget

    bar = _progress_bar(len(pairs), "layer cases", progress)
    for group in groups.values():
        if cuda:
            results = []
            for provider, case in group:
                if over_budget():
                    results.append(None)
                else:
                    try:
                        results.append(measure_case(provider, case, cuda_graph=cuda_graph))
                    except Exception as exc:  # one OOM or kernel failure must not lose the other rows
                        results.append(Failure.of(exc))
                        _free(device)
                bar.update(1)
        else:
            results = [None] * len(group) if over_budget() else measure_interleaved(group)
            bar.update(len(group))
        for (provider, case), result in zip(group, results):
            row = _base_row(provider, case)
            if result is None:
                row.update(status="not run", note=f"time budget of {time_budget:g} s spent")
            elif isinstance(result, Failure):
                row.update(status="error", note=str(result))
            else:
                row.update(result, status="ok", note="")
            rows.append(row)
        if on_rows is not None:
            add_ratios(rows)
            on_rows(rows, not_timed)
    bar.close()
    add_ratios(rows)
    return rows, not_timed


def unavailable_reason_cached(provider, device, not_timed: dict) -> Optional[str]:
    if provider.name not in not_timed:
        reason = P.unavailable_reason(provider, device)
        if reason is None:
            return None
        not_timed[provider.name] = reason
    return not_timed[provider.name]


# ------------------------------------------------------------------------------------------ sections

def run_qr_section(device: str, sizes, out_dir: Path) -> dict:
    """The QR initialisation results through ``benchmarks.qr``; a clear skip reason if it is not there."""
    try:
        from . import qr as qr_bench
    except ImportError as exc:
        return {"status": "skipped", "reason": f"benchmarks.qr is not importable ({exc})"}
    run = getattr(qr_bench, "run", None)
    if run is None:
        return {"status": "skipped", "reason": "benchmarks.qr has no run() function"}
    import inspect
    params = inspect.signature(run).parameters
    meta = environment(device)
    writer = getattr(qr_bench, "results_writer", None)
    write = writer(out_dir, "qr", meta) if writer else (lambda rows: write_results("qr", rows, meta, out_dir))
    kwargs = {}
    for name, value in (("sizes", sizes), ("device", device), ("quick", True), ("progress", False),
                        ("on_rows", write), ("routine_budget_s", 4.0 if torch.device(device).type == "cuda" else None)):
        if name in params:
            kwargs[name] = value
    try:
        rows = list(run(**kwargs))
    except Exception as exc:
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    write(rows)
    return {"status": "ok", "rows": rows}


def default_out_dir(plan: dict, device: str) -> Path:
    if plan["suite"] == "cpu-default":
        return RESULTS_DIR / "cpu-default"
    if torch.device(device).type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return RESULTS_DIR / slug
    return RESULTS_DIR / "cpu"


LAYER_COLUMNS = ["provider", "strategy", "shape", "tokens", "rank", "mode", "median_ms", "tflops",
                 "ratio_vs_frozen", "ratio_vs_peft", "ratio_vs_single", "peak_mem_mb", "status"]
MODEL_COLUMNS = ["model", "method", "rank", "trainable_params", "median_ms", "tokens_per_s", "state_mb",
                 "peak_mem_mb", "speedup_vs_full_ft", "status"]


def layer_meta(plan: dict, device: str, not_timed: dict, cuda_graph: bool) -> dict:
    cuda = torch.device(device).type == "cuda"
    meta = environment(device)
    meta.update({
        "suite": plan["suite"],
        "plan": {k: v for k, v in plan.items() if k not in ("shapes", "multi_shapes")}
        | {"shapes": [f"{n}x{k}" for n, k in plan["shapes"]],
           "multi_shapes": [f"{n}x{k}" for n, k in plan.get("multi_shapes") or []] or "every shape"},
        "providers_timed": [p for p in plan["providers"] if p not in not_timed],
        "providers_not_timed": not_timed,
        "timing_method": ("triton.testing.do_bench" + ("_cudagraph" if cuda_graph else "")
                          + " medians (CUDA events, warm-up, L2 flushed between reps)") if cuda
        else "wall clock (time.perf_counter), median of >= 5 calls after 2 warm-up calls",
        "input_rotation": "x (and dY) rotate through several random buffers (together > L2 on CUDA)",
        "peak_memory_method": "torch.cuda.max_memory_allocated over one step from an empty allocator "
                              "(weights, one input set, activations, gradients)" if cuda
        else "not measured on CPU (torch keeps no CPU allocator statistics): peak_mem_mb is null",
        "flops_definition": "nominal flops of each provider's algorithm, see benchmarks/providers.py",
        "mode_definition": {"fwd": "forward under torch.no_grad()",
                            "fwd+bwd": "forward + autograd.grad w.r.t. x and the trainable parameters"},
    })
    return meta


def _announce(plan: dict, device: str) -> None:
    if plan["suite"] == "cpu-default":
        print("CPU default (no CUDA device): a small run, not the GPU suite. Timed: the torch paths ("
              + ", ".join(plan["providers"]) + f") on {', '.join(f'{n}x{k}' for n, k in plan['shapes'])}, "
              f"T={plan['tokens']}, {plan['dtype']}, {torch.get_num_threads()} CPU thread(s). NOT timed: the Triton "
              "path (on CPU it would run in Triton's interpreter, far too slow to time meaningfully). These are CPU "
              "numbers, not GPU numbers.")
    else:
        print(f"suite: {plan['suite']} on {device}; providers: {', '.join(plan['providers'])}")


def run_profile_case(spec: str, device: str) -> int:
    """``--case``: run one case with NVTX ranges inside a profiler capture window."""
    fields = parse_case(spec)
    provider = P.PROVIDERS[fields["provider"]]
    n, k = fields["shape"]
    case = P.Case(n, k, fields["tokens"], fields["rank"], P.DTYPES[fields["dtype"]], fields["mode"], device)
    reason = P.unavailable_reason(provider, device)
    if reason is not None:
        print(f"cannot run {provider.name} on {device}: {reason}", file=sys.stderr)
        return 2
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, P.buffer_count(case))
    step = P.make_step(module, case, xs, dys)
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):  # compile / autotune outside the capture window
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    label = f"bench/{provider.name}/{case.shape}/T{case.tokens}/r{case.rank}/{case.mode}"
    for i in range(fields["iters"]):
        if cuda:
            with torch.cuda.nvtx.range(f"{label}/iter{i}"):
                step()
        else:
            step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ran {fields['iters']} iterations of {label} (strategy {P.chosen_strategy(provider, case)})")
    return 0


def parse_case(spec: str) -> dict:
    """'shape=NxK,tokens=T,rank=r,provider=name,mode=fwd+bwd[,dtype=bf16][,iters=20]' -> dict, validated."""
    fields = {"dtype": "bf16" if torch.cuda.is_available() else "fp32", "iters": 20, "mode": "fwd+bwd"}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--case items are key=value, got {item!r} in {spec!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        fields[key] = value
    unknown = set(fields) - {"shape", "tokens", "rank", "provider", "mode", "dtype", "iters"}
    if unknown:
        raise ValueError(f"unknown --case key(s) {sorted(unknown)}; known: shape, tokens, rank, provider, mode, "
                         "dtype, iters")
    missing = [k for k in ("shape", "tokens", "rank", "provider") if k not in fields]
    if missing:
        raise ValueError(f"--case needs {', '.join(missing)} (e.g. shape=4096x4096,tokens=2048,rank=64,"
                         "provider=qrlora_triton)")
    found = re.fullmatch(r"(\d+)x(\d+)", fields["shape"])
    if not found:
        raise ValueError(f"--case shape must be OUTxIN, got {fields['shape']!r}")
    fields["shape"] = (int(found.group(1)), int(found.group(2)))
    for key in ("tokens", "rank", "iters"):
        if not str(fields[key]).isdigit() or int(fields[key]) < 1:
            raise ValueError(f"--case {key} must be a positive int, got {fields[key]!r}")
        fields[key] = int(fields[key])
    if fields["provider"] not in P.PROVIDERS:
        raise ValueError(f"--case provider {fields['provider']!r} is unknown; known: {', '.join(P.PROVIDERS)}")
    if fields["mode"] not in P.MODES:
        raise ValueError(f"--case mode must be one of {P.MODES}, got {fields['mode']!r}")
    if fields["dtype"] not in P.DTYPES:
        raise ValueError(f"--case dtype must be one of {list(P.DTYPES)}, got {fields['dtype']!r}")
    return fields


def _load_rows(path: Path) -> tuple[dict, list]:
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    return data.get("meta", {}), data.get("rows", [])


def summarize(out_dir: Path) -> str:
    """A short text summary of a results folder: per layer case, the frozen floor, PEFT LoRA and the best
    QR-LoRA provider at the largest rank measured, with the issue's bars; the multi-adapter ratios; model-level
    tokens/s; the QR timings with their ratios and bars; the initialisation times."""
    out_dir = Path(out_dir)
    parts = []
    meta, rows = _load_rows(out_dir / "throughput.json")
    if rows:
        ok = [r for r in rows if r.get("status") == "ok"]
        single = [r for r in ok if P.PROVIDERS.get(r["provider"], P.PROVIDERS["full_ft"]).num_adapters == 1]
        summary = []
        for key in dict.fromkeys((r["shape"], r["tokens"], r["mode"]) for r in single):
            group = [r for r in single if (r["shape"], r["tokens"], r["mode"]) == key]
            ranks = sorted({r["rank"] for r in group if r["rank"] is not None})
            frozen = next((r for r in group if r["provider"] == "frozen_linear"), None)
            for rank in ranks[-1:]:
                peft = next((r for r in group if r["provider"] == "peft_lora" and r["rank"] == rank), None)
                ours = [r for r in group if r["provider"].startswith("qrlora") and r["rank"] == rank]
                best = min(ours, key=lambda r: r["median_ms"]) if ours else None
                limit = 1.05 if key[2] == "fwd" else 1.10
                applies = best is not None and key[1] >= 8 * rank
                vs_frozen = best and best.get("ratio_vs_frozen")
                vs_peft = best and best.get("ratio_vs_peft")
                summary.append({"shape": key[0], "T": key[1], "mode": key[2], "r": rank,
                                "frozen_ms": frozen and frozen["median_ms"], "peft_ms": peft and peft["median_ms"],
                                "best_qrlora": best and f"{best['provider']}({best.get('strategy')})",
                                "qrlora_ms": best and best["median_ms"], "vs_frozen": vs_frozen, "vs_peft": vs_peft,
                                "bar_frozen": (f"<={limit:g} " + ("met" if vs_frozen <= limit else "NOT MET"))
                                if applies and vs_frozen is not None else "",
                                "bar_peft": ("<=1 " + ("met" if vs_peft <= 1 else "NOT MET"))
                                if vs_peft is not None else ""})
        bad = [r for r in rows if r.get("status") != "ok"]
        complete = "" if meta.get("complete", True) else ", INCOMPLETE: the run stopped before its end"
        parts.append(f"layer level ({meta.get('gpu') or 'CPU'}, {meta.get('date')}, commit {meta.get('git_commit')}"
                     f"{complete}; issue bars: fwd <= 1.05x and fwd+bwd <= 1.10x frozen where T >= 8r, "
                     "<= 1x PEFT LoRA):")
        parts.append(format_table(summary, ["shape", "T", "mode", "r", "frozen_ms", "peft_ms", "best_qrlora",
                                            "qrlora_ms", "vs_frozen", "bar_frozen", "vs_peft", "bar_peft"]))
        multi = [r for r in ok if r.get("ratio_vs_single") is not None or r.get("ratio_vs_single_lowrank") is not None]
        if multi:
            parts.append(f"\n{P.MULTI_ADAPTERS:,} adapters mixed in one batch vs one adapter (issue bar: <= 1.1x):")
            parts.append(format_table([dict(r, bar=("met" if r["ratio_vs_single"] <= 1.1 else "NOT MET")
                                            if r.get("ratio_vs_single") is not None else "") for r in multi],
                                      ["provider", "shape", "tokens", "rank", "mode", "median_ms", "ratio_vs_single",
                                       "bar", "ratio_vs_single_lowrank"]))
        if bad:
            statuses = ", ".join(f"{n} {s}" for s, n in
                                 sorted({s: sum(r.get("status") == s for r in bad) for s in
                                         {r.get("status") for r in bad}}.items()))
            first_error = next((r for r in bad if r.get("status") == "error"), bad[0])
            parts.append(f"{len(bad)} layer case(s) not ok ({statuses}), e.g. {first_error['provider']} "
                         f"{first_error['shape']} T={first_error['tokens']}: {first_error['status']} "
                         f"{first_error.get('note', '')}")
        for name, reason in meta.get("providers_not_timed", {}).items():
            parts.append(f"not timed: {name}: {reason}")
    _, model_rows = _load_rows(out_dir / "models.json")
    if model_rows:
        parts.append("\nmodel level (one training step):")
        parts.append(format_table(model_rows, ["model", "method", "rank", "tokens_per_s", "state_mb", "peak_mem_mb",
                                               "status"]))
    qr_meta, qr_rows = _load_rows(out_dir / "qr.json")
    if qr_rows:
        parts.append(f"\nQR initialisation ({qr_meta.get('gpu') or 'CPU'}):")
        parts.append(format_table(qr_rows, [c for c in ("m", "n", "routine", "status", "median_ms", "vs_linalg_qr",
                                                        "vs_geqrf", "vs_svd", "note")
                                            if any(c in r for r in qr_rows)]))
        from .qr import bar_checks, format_bars
        # From the rows (files written before the CPU bars existed stored the GPU bars for CPU runs too).
        parts.append(format_bars(bar_checks(qr_rows, on_gpu=bool(qr_meta.get("gpu")))))
    for path in sorted(out_dir.glob("init_time*.json")):
        init_meta, init_rows = _load_rows(path)
        if not init_rows:
            continue
        parts.append(f"\ninitialisation ({path.stem}: {init_meta.get('matrices')}, {init_meta.get('dtype')}, "
                     f"{init_meta.get('gpu') or 'CPU'}):")
        columns = [c for c in ("method", "status", "median_ms", "full_model_ms_extrapolated", "bar_s", "bar_met",
                               "ranks", "note") if any(r.get(c) not in (None, "") for r in init_rows)]
        parts.append(format_table(init_rows, columns))
        if init_meta.get("extrapolation"):
            parts.append(init_meta["extrapolation"])
    if not parts:
        return f"no results in {out_dir} (expected throughput.json, models.json, qr.json or init_time*.json)"
    return "\n".join(parts)


def _print_failures(rows: list[dict], key: tuple[str, ...], limit: int = 10) -> None:
    failed = [r for r in rows if r.get("status") not in ("ok", "not run")]
    for r in failed[:limit]:
        print(f"{r['status']}: {' '.join(str(r.get(k)) for k in key)}: {r.get('note')}")
    if len(failed) > limit:
        print(f"... and {len(failed) - limit} more failed rows (see the JSON)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but no CUDA device is available")
    if args.summary is not None:
        if not Path(args.summary).is_dir():
            parser.error(f"--summary {args.summary}: no such results folder")
        print(summarize(args.summary))
        return 0
    if args.case is not None:
        try:
            return run_profile_case(args.case, device)
        except ValueError as exc:
            parser.error(str(exc))
    cuda = torch.device(device).type == "cuda"
    plan = resolve_plan(args, cuda=cuda)
    # Ranks no shape can take: every case would be skipped, and the run would write an empty table.
    for token in (plan.get("ranks") or ()) if args.only in (None, "layers") else ():
        if plan.get("shapes") and all(_resolve_rank(str(token), n, k) is None for n, k in plan["shapes"]):
            parser.error(f"--ranks {token} exceeds min(out, in) of every shape "
                         f"({', '.join(f'{n}x{k}' for n, k in plan['shapes'])})")
    threads = args.threads or (1 if plan["suite"] == "cpu-default" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(args.out or default_out_dir(plan, device))
    try:  # before anything is measured: a bad --out failed only when the first results were written
        check_writable_folder(out_dir)
    except OSError as err:
        parser.error(f"--out {out_dir}: cannot write there ({err.strerror or err})")
    _announce(plan, device)
    started = time.perf_counter()
    written, failed_sections = [], []

    sections = {args.only} if args.only else {"layers", "models", "qr"}
    if args.model_level == "off" or (args.model_level == "auto" and not args.only and args.model_presets is None
                                     and plan["suite"] not in ("gpu", "gpu-quick", "cpu-default")):
        sections.discard("models")
    if args.no_qr:
        sections.discard("qr")

    if "layers" in sections:
        def write_so_far(rows_so_far, not_timed_so_far):
            write_results("throughput", rows_so_far, layer_meta(plan, device, not_timed_so_far, args.cuda_graph)
                          | {"complete": False}, out_dir)

        rows, not_timed = run_layers(plan, device, cuda_graph=args.cuda_graph, time_budget=args.time_budget,
                                     progress=sys.stderr.isatty(), on_rows=write_so_far)
        meta = layer_meta(plan, device, not_timed, args.cuda_graph) | {"complete": True}
        paths = write_results("throughput", rows, meta, out_dir)
        written += list(paths.values())
        print("\nLayer level (" + ("CPU default, " if plan["suite"] == "cpu-default" else "")
              + f"{plan['dtype']}, median ms; ratios: time / frozen linear's and / PEFT LoRA's):")
        print(format_table(rows, LAYER_COLUMNS))
        _print_failures(rows, ("provider", "shape", "tokens", "rank", "mode"))
        for name, reason in not_timed.items():
            print(f"not timed: {name}: {reason}")
        if not args.no_plot:
            try:
                from .plots import plot_layers
                written.append(plot_layers(rows, out_dir / "throughput.png", meta))
            except ImportError as exc:  # the bare GPU image may lack matplotlib: the numbers matter more
                print(f"PNG not written: {exc}")
            except ValueError as exc:
                print(f"PNG not written: {exc}")

    if "models" in sections:
        from .models import METHODS, run_models
        dtype = P.DTYPES[plan["dtype"]]
        bar = _progress_bar(len(plan["model_presets"]) * len(METHODS), "model steps", sys.stderr.isatty())
        model_rows = run_models(plan["model_presets"], device=device, dtype=dtype, progress=bar)
        bar.close()
        meta = environment(device) | {"suite": plan["suite"], "peak_memory_method": (
            "torch.cuda.max_memory_allocated over one training step" if cuda else "not measured on CPU"),
            "step": "zero_grad + forward + loss + backward + AdamW step, see benchmarks/models.py"}
        written += list(write_results("models", model_rows, meta, out_dir).values())
        print(f"\nModel level (one training step, {plan['dtype']}):")
        print(format_table(model_rows, MODEL_COLUMNS))
        _print_failures(model_rows, ("model", "method"))

    if "qr" in sections:
        qr = run_qr_section(device, args.qr_sizes or (QR_SIZES_GPU if cuda else QR_SIZES_CPU), out_dir)
        if qr["status"] == "ok":
            print("\nQR initialisation (benchmarks.qr):")
            columns = [c for c in qr["rows"][0]] if qr["rows"] else []
            print(format_table(qr["rows"], columns[:10]))
            written += [out_dir / "qr.json", out_dir / "qr.csv"]
        else:
            print(f"\nQR initialisation: {qr['status']}: {qr['reason']}")
            if qr["status"] == "error":
                failed_sections.append("qr")

    print(f"\nwrote {', '.join(str(p) for p in written)} ({time.perf_counter() - started:.0f} s)")
    if failed_sections:  # what was measured is written; the exit status says a section failed
        print(f"failed: {', '.join(failed_sections)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
