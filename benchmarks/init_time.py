"""Initialisation time of QR-LoRA: ``apply_qrlora`` on a model's weights, against the scipy route.

Two shape sets, random weights (normal, std 0.02), on ``--device`` (default: cuda if present):

* ``roberta-qv`` (default): RoBERTa-base's attention, all query and value matrices: 24 x 768x768,
  fp32. Side by side in one run: ``apply_qrlora`` with the paper's rule (``energy="diag"``,
  tau=0.9: a full pivoted QR each), the early-stopping Frobenius rule (tau=0.9), a fixed rank
  (8) and the global budget (601); and the scipy route: per matrix
  ``scipy.linalg.qr(W, pivoting=True, mode="economic")`` (LAPACK geqp3) on the CPU, the same
  diagonal-energy rank rule, and Q_r / R_r = R[:r, argsort(perm)].
* ``llama7b``: the issue's GPU target, Llama-2-7B's 7 projection types x 32 layers
  (4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down), bf16. No scipy route (hours on a
  CPU); one timed run per rule, since one model's bases take tens of GB.

Medians after a warm-up (benchmarks/harness.py), whole-call wall clock with the device
synchronised. Each rule runs on its own: one that raises gives an error row and the others still run, and
the result files are rewritten after every rule (a run killed part-way keeps what it measured).

With ``--layers`` below the shape set's real depth (the GPU suite converts 2 of Llama-2-7B's 32 layers to fit its
time), each row also gives ``full_model_ms_extrapolated``: the median scaled linearly to the real layer count
(every layer has the same shapes, and the conversion is per matrix), labelled as such, and checked against the
issue's bars (``BARS_S``: 30 s for energy="diag", 5 s for "frobenius" or a fixed rank, on one H100/H200; the
randomized and budget rows carry no bar). Run::

    python -m benchmarks.init_time                          # -> benchmarks/results/cpu/init_time.{json,csv}
    python -m benchmarks.init_time --threads 1              # -> .../init_time_1thread.{json,csv}
    python -m benchmarks.init_time --shapes llama7b --device cuda
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from benchmarks.harness import RESULTS_DIR, environment, format_table, measure, positive_int, write_results

SHAPES = {
    # name: (container path, {module: (out, in)}, layers, default dtype, targets)
    "roberta-qv": ("encoder.layer", {"attention.self.query": (768, 768), "attention.self.value": (768, 768)},
                   12, torch.float32),
    "llama7b": ("model.layers", {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
                                 "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
                                 "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
                                 "mlp.down_proj": (4096, 11008)}, 32, torch.bfloat16),
}


def build_model(shapes: str, layers: int, device, dtype) -> nn.Module:
    """An nn.Module holding only the adapted weights, under the real model's module names."""
    container, modules, _, _ = SHAPES[shapes]
    root = nn.Module()
    stack = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        for path, (out_features, in_features) in modules.items():
            parent = block
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
            nn.init.normal_(linear.weight, std=0.02)
            parent.add_module(leaf, linear)
        stack.append(block)
    parent = root
    *parents, leaf = container.split(".")
    for part in parents:
        parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, stack)
    return root.requires_grad_(False)


def scipy_route(weights: list[torch.Tensor], tau: float):
    """Per matrix: LAPACK geqp3 through scipy, the diag-energy rank, and the torch basis tensors."""
    out = []
    for w in weights:
        q, r, perm = scipy.linalg.qr(w.numpy(), pivoting=True, mode="economic")
        d = np.diag(r).astype(np.float64) ** 2
        cumulative = np.cumsum(d)
        rank = min(int((cumulative < tau * cumulative[-1]).sum()) + 1, d.size)
        perm_t = torch.from_numpy(perm.astype(np.int64))
        out.append((torch.from_numpy(q[:, :rank].copy()), torch.from_numpy(r[:rank])[:, torch.argsort(perm_t)],
                    perm_t, rank))
    return out


# The initialisation bars for the whole Llama-2-7B model on one H100/H200, seconds, per rule.
BARS_S = {"diag": 30.0, "frobenius": 5.0, "rank": 5.0}


def _rank_summary(ranks: list[int]) -> str:
    return f"{min(ranks)}..{max(ranks)} (sum {sum(ranks)})" if ranks else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="roberta-qv")
    parser.add_argument("--layers", type=positive_int, default=None, help="override the number of layers")
    parser.add_argument("--rules", default="diag,frobenius,rank,budget,diag-randomized,frobenius-randomized",
                        help="comma-separated subset of diag, frobenius, rank, budget, diag-randomized, "
                             "frobenius-randomized (the last two: qr_method='randomized')")
    parser.add_argument("--reps", type=positive_int, default=None, help="timed runs per rule (default 3; llama7b 1)")
    parser.add_argument("--no-scipy", action="store_true", help="skip the scipy geqp3 route")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/<device type>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for scipy's BLAS (e.g. 1 on a shared, busy machine)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rules not started by then are reported as not run")
    args = parser.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(args.threads)
        with threadpool_limits(limits=args.threads):
            return _run(args, parser)
    return _run(args, parser)


def _run(args, parser):

    from qrlora_kernels import QRLoraConfig, apply_qrlora

    _, modules, default_layers, dtype = SHAPES[args.shapes]
    layers = args.layers or default_layers
    big = args.shapes == "llama7b"
    reps = args.reps or (1 if big else 3)
    device = torch.device(args.device)
    targets = [path.rsplit(".", 1)[1] for path in modules]
    rules = {
        "diag": QRLoraConfig(target_modules=targets, tau=0.9),
        "frobenius": QRLoraConfig(target_modules=targets, tau=0.9, energy="frobenius"),
        "rank": QRLoraConfig(target_modules=targets, rank=8),
        "budget": QRLoraConfig(target_modules=targets, budget=601),
        "diag-randomized": QRLoraConfig(target_modules=targets, tau=0.9, qr_method="randomized"),
        "frobenius-randomized": QRLoraConfig(target_modules=targets, tau=0.9, energy="frobenius",
                                             qr_method="randomized"),
    }
    chosen = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(rules))
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; choose from {sorted(rules)}")

    shapes_text = ", ".join(f"{o}x{i}" for o, i in modules.values())
    scaled = layers != default_layers
    meta = environment(device) | {
        "shapes": args.shapes, "threads": args.threads or torch.get_num_threads(),
        "matrices": f"{layers} layers x [{shapes_text}]", "layers_timed": layers, "model_layers": default_layers,
        "dtype": str(dtype), "note": "random weights, normal std 0.02; scipy on the CPU",
        "bars_s": BARS_S if big else None,
        "extrapolation": (f"full_model_ms_extrapolated = median_ms x {default_layers}/{layers}: EXTRAPOLATED from "
                          f"{layers} of the model's {default_layers} layers (all layers have the same shapes), "
                          "not measured on the whole model") if scaled else None}
    name = "init_time" if args.shapes == "roberta-qv" else f"init_time_{args.shapes}"
    if args.threads is not None:
        name += f"_{args.threads}thread"
    out_dir = args.out or RESULTS_DIR / device.type
    rows = []

    def publish():
        write_results(name, rows, meta, out_dir=out_dir)

    def finish(row: dict, rule: str | None) -> dict:
        full = row["median_ms"] * default_layers / layers if row.get("median_ms") is not None else None
        bar = BARS_S.get(rule) if big and rule else None
        row.update({"layers_timed": layers,
                    "full_model_ms_extrapolated": full if scaled else None,
                    "bar_s": bar, "bar_met": (full / 1e3 <= bar) if bar is not None and full is not None else None})
        return row

    started = time.perf_counter()
    scipy_ms = None
    if not (args.no_scipy or big):
        torch.manual_seed(0)
        weights = [m.weight.detach().float().cpu() for m in build_model(args.shapes, layers, "cpu", dtype).modules()
                   if isinstance(m, nn.Linear)]
        try:
            baseline = measure(lambda: scipy_route(weights, 0.9), reps=reps)
            scipy_ms = baseline.median_ms
            rows.append(finish({"method": "scipy geqp3 (CPU) + diag rule tau=0.9", "status": "ok",
                                "median_ms": baseline.median_ms, "p20_ms": baseline.p20_ms, "p80_ms": baseline.p80_ms,
                                "ranks": _rank_summary([r for *_, r in scipy_route(weights, 0.9)]),
                                "speedup_vs_scipy": 1.0}, None))
        except Exception as exc:
            rows.append(finish(_failed("scipy geqp3 (CPU) + diag rule tau=0.9", "error", exc), None))
        publish()
    if big:
        # One timed run per rule and no warm-up run (a whole model's bases): the process's one-time costs (the
        # CUDA libraries, cuBLAS / cuSOLVER handles, the extension's kernels) are paid here on a small model,
        # not billed to the first rule (and multiplied by the extrapolation).
        _warm_up([rules[rule] for rule in chosen], targets, device, dtype)
        meta["warm_up"] = "one untimed apply_qrlora per rule on 256x256 weights before the timed runs"
    labels = {"diag": "diag tau=0.9", "frobenius": "frobenius tau=0.9", "rank": "rank=8", "budget": "budget=601",
              "diag-randomized": "diag tau=0.9, randomized pivoting",
              "frobenius-randomized": "frobenius tau=0.9, randomized pivoting"}
    for rule in chosen:
        method = f"apply_qrlora {labels[rule]}"
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            rows.append(finish(_failed(method, "not run", f"time budget of {args.time_budget:g} s spent"), rule))
            publish()
            continue
        config = rules[rule]
        warmup = 0 if big else 1
        reports = []
        fresh = []
        try:
            # Each timed call converts a fresh model (apply_qrlora works in place); building them is not timed.
            torch.manual_seed(0)
            fresh = [build_model(args.shapes, layers, device, dtype) for _ in range(warmup + reps)]

            def run():
                model = fresh.pop()
                reports[:] = [apply_qrlora(model, config, progress=False)]
                if device.type == "cuda":
                    torch.cuda.synchronize()

            timing = measure(run, device="cpu", warmup=warmup, reps=reps)
            ranks = [m.rank for m in reports[-1].modules]
            rows.append(finish({"method": method, "status": "ok", "median_ms": timing.median_ms,
                                "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "ranks": _rank_summary(ranks),
                                "speedup_vs_scipy": scipy_ms / timing.median_ms if scipy_ms else None}, rule))
        except Exception as exc:  # one failing rule (an OOM, a CUDA error) must not lose the other rows
            rows.append(finish(_failed(method, "error", exc), rule))
            print(f"init_time: {method} failed: {rows[-1]['note']}", flush=True)
        reports.clear()
        fresh.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        publish()
    columns = ["method", "status", "median_ms", "p20_ms", "p80_ms", "speedup_vs_scipy", "ranks"]
    if scaled:
        columns += ["full_model_ms_extrapolated"]
    if big:
        columns += ["bar_s", "bar_met"]
    print(format_table(rows, columns))
    if scaled:
        print(meta["extrapolation"])
    publish()
    print(f"wrote {out_dir / (name + '.json')}")


def _warm_up(configs, targets, device, dtype) -> None:
    from qrlora_kernels import apply_qrlora

    for config in configs:
        small = nn.ModuleDict({t: nn.Linear(256, 256, bias=False, device=device, dtype=dtype) for t in targets})
        try:
            apply_qrlora(small, config, progress=False)
        except Exception:  # noqa: BLE001 -- the rule's timed run fails the same way and gives the error row
            pass
    if device.type == "cuda":
        torch.cuda.synchronize()


def _failed(method: str, status: str, what) -> dict:
    note = f"{type(what).__name__}: {what}"[:300] if isinstance(what, BaseException) else str(what)
    return {"method": method, "status": status, "median_ms": None, "p20_ms": None, "p80_ms": None, "ranks": "",
            "speedup_vs_scipy": None, "note": note}


if __name__ == "__main__":
    main()
