"""Initialisation time of QR-LoRA on RoBERTa-base's attention: all query and value matrices.

24 weights of 768x768 (12 layers x {query, value}), fp32, random with RoBERTa's init
(normal, std 0.02), on this machine's device (CPU here). Side by side in one run:

* ``apply_qrlora`` with the paper's rule (``energy="diag"``, tau=0.9: a full pivoted QR each),
  the early-stopping Frobenius rule (tau=0.9), a fixed rank (8), and the global budget (601);
* the scipy route: per matrix ``scipy.linalg.qr(W, pivoting=True, mode="economic")`` (LAPACK
  geqp3), the same diagonal-energy rank rule, and Q_r / R_r = R[:r, argsort(perm)] in torch.

Medians after a warm-up (benchmarks/harness.py). Run::

    python -m benchmarks.init_time            # writes benchmarks/results/cpu/init_time.{json,csv}
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import scipy.linalg
import torch
from torch import nn

from benchmarks.harness import RESULTS_DIR, environment, format_table, measure, write_results

HIDDEN, LAYERS = 768, 12


class RobertaAttentionWeights(nn.Module):
    """Only the adapted part of roberta-base: ``encoder.layer.<i>.attention.self.{query,value}``."""

    def __init__(self, device, dtype):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(LAYERS):
            block = nn.Module()
            block.attention = nn.Module()
            block.attention.self = nn.Module()
            for name in ("query", "value"):
                linear = nn.Linear(HIDDEN, HIDDEN, device=device, dtype=dtype)
                nn.init.normal_(linear.weight, std=0.02)
                setattr(block.attention.self, name, linear)
            self.encoder.layer.append(block)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from qrlora_kernels import QRLoraConfig, apply_qrlora

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), torch.float32
    template = RobertaAttentionWeights(device, dtype).requires_grad_(False)
    weights = [m.weight.detach().cpu() for m in template.modules() if isinstance(m, nn.Linear)]
    configs = {
        "qrlora diag tau=0.9": QRLoraConfig(target_modules=["query", "value"], tau=0.9),
        "qrlora frobenius tau=0.9": QRLoraConfig(target_modules=["query", "value"], tau=0.9, energy="frobenius"),
        "qrlora rank=8": QRLoraConfig(target_modules=["query", "value"], rank=8),
        "qrlora budget=601": QRLoraConfig(target_modules=["query", "value"], budget=601),
    }
    rows = []
    baseline = measure(lambda: scipy_route(weights, 0.9), reps=args.reps)
    rows.append({"method": "scipy geqp3 + diag rule tau=0.9", "median_ms": baseline.median_ms,
                 "p20_ms": baseline.p20_ms, "p80_ms": baseline.p80_ms, "ranks": "",
                 "speedup_vs_scipy": 1.0})
    for label, config in configs.items():
        copies = iter([copy.deepcopy(template) for _ in range(args.reps + 1)])
        reports = []

        def run():
            reports.append(apply_qrlora(next(copies), config, progress=False))
            if device.type == "cuda":
                torch.cuda.synchronize()
        timing = measure(run, device="cpu", reps=args.reps)  # wall clock: the whole apply, synchronised
        ranks = [m.rank for m in reports[-1].modules]
        rows.append({"method": label, "median_ms": timing.median_ms, "p20_ms": timing.p20_ms,
                     "p80_ms": timing.p80_ms, "ranks": f"{min(ranks)}..{max(ranks)} (sum {sum(ranks)})",
                     "speedup_vs_scipy": baseline.median_ms / timing.median_ms})
    scipy_ranks = [r for *_, r in scipy_route(weights, 0.9)]
    rows[0]["ranks"] = f"{min(scipy_ranks)}..{max(scipy_ranks)} (sum {sum(scipy_ranks)})"
    meta = environment(device) | {"matrices": f"{2 * LAYERS} x {HIDDEN}x{HIDDEN} fp32",
                                  "note": "RoBERTa-base query+value init; scipy route runs on the CPU"}
    print(format_table(rows, ["method", "median_ms", "p20_ms", "p80_ms", "speedup_vs_scipy", "ranks"]))
    paths = write_results("init_time", rows, meta, out_dir=RESULTS_DIR / device.type)
    print(f"wrote {paths['json']}")


if __name__ == "__main__":
    main()
