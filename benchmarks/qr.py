"""Pivoted QR speed: ``qrcp`` (both modes, full and truncated) against the alternatives.

Side by side in one run, fp32, random N(0, 1) matrices, medians after a warm-up
(benchmarks/harness.py):

* ``qrcp`` geqp3 and randomized, full and truncated at rank 64 and 256, returning Q; and full in
  ``mode="raw"`` (compact Householder form, Q not formed: the like-for-like row against
  ``torch.geqrf``, which does not form Q either; ``torch.linalg.qr`` does);
* ``scipy.linalg.qr(pivoting=True)`` (LAPACK geqp3; CPU only): the bar for the deterministic mode;
* ``torch.geqrf`` and ``torch.linalg.qr`` (unpivoted QR): the floor;
* ``torch.linalg.svd``: what SVD-initialised methods pay;
* on CUDA, ``cupy.linalg.qr`` when cupy is installed.

Every row carries its ratio to scipy's geqp3 (CPU), to ``torch.geqrf`` and to the SVD of the
same size, all measured in this run. Run::

    python -m benchmarks.qr                       # quick CPU set (1024^2, 2048^2), ~1-2 min
    python -m benchmarks.qr --full                # 1024^2, 2048^2, 4096^2, 4096x11008 (slow on CPU)
    python -m benchmarks.qr --sizes 4096 --routines qrcp,scipy_geqp3,geqrf --threads 1

Writes ``benchmarks/results/<device>/qr.{json,csv}``. On a shared CPU the BLAS thread pools of
torch (OpenMP) and scipy (OpenBLAS) spin after each call; a short pause between routines keeps
one pool's spinning from being billed to the next routine.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch

from benchmarks.harness import RESULTS_DIR, environment, format_table, measure, write_results

QUICK_SIZES = [(1024, 1024), (2048, 2048)]
FULL_SIZES = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008)]
TRUNCATED_RANKS = (64, 256)
POOL_PAUSE_S = 0.5


def parse_size(text: str) -> tuple[int, int]:
    m, _, n = text.lower().partition("x")
    return int(m), int(n or m)


def routines(A: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Name -> zero-argument callable, for one input matrix."""
    from qrlora_kernels import qrcp

    device = A.device
    out: dict[str, Callable[[], object]] = {}
    for method in ("geqp3", "randomized"):
        out[f"qrcp_{method}"] = lambda method=method: qrcp(A, method=method, _seed=0)
        out[f"qrcp_{method}_raw"] = lambda method=method: qrcp(A, method=method, mode="raw", _seed=0)
        for r in TRUNCATED_RANKS:
            if r <= min(A.shape):
                out[f"qrcp_{method}_rank{r}"] = lambda method=method, r=r: qrcp(A, rank=r, method=method, _seed=0)
    if device.type == "cpu":
        import scipy.linalg

        A_np = A.numpy()
        out["scipy_geqp3"] = lambda: scipy.linalg.qr(A_np, pivoting=True, mode="economic")
    out["geqrf"] = lambda: torch.geqrf(A)
    out["linalg_qr"] = lambda: torch.linalg.qr(A)
    out["svd"] = lambda: torch.linalg.svd(A, full_matrices=False)
    if device.type == "cuda":
        try:
            import cupy

            A_cp = cupy.asarray(A)
            out["cupy_qr"] = lambda: cupy.linalg.qr(A_cp)
        except ImportError:
            pass
    return out


def run(sizes, *, device: str = "cpu", dtype=torch.float32, reps: int = 3, warmup: int = 1,
        only: set[str] | None = None, progress: bool = True) -> list[dict]:
    """Time every routine at every size; returns rows with medians and same-run ratios.

    Repetitions are interleaved (A B C, A B C, ...) so that the load of a shared machine falls on
    every routine alike; each sample is one ``harness.measure`` call. On the CPU each row also
    carries the median process CPU time, which descheduling by other users does not inflate.
    """
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(sizes), desc="qr benchmark", disable=not progress)
    for m, n in sizes:
        A = torch.randn(m, n, dtype=dtype, device=device)
        plan = {name: fn for name, fn in routines(A).items()
                if only is None or name in only or any(name.startswith(o) for o in only)}
        wall: dict[str, list[float]] = {name: [] for name in plan}
        cpu: dict[str, list[float]] = {name: [] for name in plan}
        for name, fn in plan.items():
            bar.set_postfix_str(f"{m}x{n} warm-up {name}")
            for _ in range(warmup):
                fn()
        for rep in range(reps):
            for name, fn in plan.items():
                bar.set_postfix_str(f"{m}x{n} rep {rep + 1}/{reps} {name}")
                time.sleep(POOL_PAUSE_S)
                c0 = time.process_time()
                wall[name].append(measure(fn, device=device, warmup=0, reps=1).median_ms)
                cpu[name].append((time.process_time() - c0) * 1e3)
        for name in plan:
            w = sorted(wall[name])
            rows.append({"m": m, "n": n, "dtype": str(dtype).replace("torch.", ""), "routine": name,
                         "median_ms": statistics.median(w), "p20_ms": w[int(0.2 * (len(w) - 1))],
                         "p80_ms": w[round(0.8 * (len(w) - 1))], "reps": len(w),
                         "cpu_ms": statistics.median(cpu[name]) if torch.device(device).type == "cpu" else None})
        bar.update(1)
    bar.close()
    for row in rows:
        same = {r["routine"]: r for r in rows if (r["m"], r["n"]) == (row["m"], row["n"])}
        for ref in ("scipy_geqp3", "geqrf", "linalg_qr", "svd"):
            row[f"vs_{ref}"] = row["median_ms"] / same[ref]["median_ms"] if ref in same else None
            if row["cpu_ms"] is not None and ref in ("scipy_geqp3", "geqrf"):
                row[f"cpu_vs_{ref}"] = row["cpu_ms"] / same[ref]["cpu_ms"] if ref in same else None
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="comma list: 2048 or 4096x11008 (default: the quick CPU set)")
    parser.add_argument("--full", action="store_true", help="all sizes of the issue (slow on the CPU)")
    parser.add_argument("--quick", action="store_true", help="the quick set (default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int,
                        help="CPU threads for every routine alike (torch's OpenMP/MKL and scipy's OpenBLAS)")
    parser.add_argument("--routines", help="comma list of routine names or prefixes (default: all)")
    parser.add_argument("--out", default="qr", help="result file stem")
    args = parser.parse_args(argv)
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    else:
        sizes = FULL_SIZES if args.full else QUICK_SIZES
    only = set(args.routines.split(",")) if args.routines else None
    torch.manual_seed(0)
    limits = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(limits=args.threads)
    with limits:
        rows = run(sizes, device=args.device, reps=args.reps, warmup=args.warmup, only=only)
    print(format_table(rows, ["m", "n", "routine", "median_ms", "p20_ms", "p80_ms", "cpu_ms", "vs_scipy_geqp3",
                              "vs_geqrf", "vs_linalg_qr", "vs_svd", "cpu_vs_scipy_geqp3", "cpu_vs_geqrf"]))
    meta = {**environment(args.device), "threads": args.threads or torch.get_num_threads()}
    paths = write_results(args.out, rows, meta, RESULTS_DIR / torch.device(args.device).type)
    print(f"wrote {paths['json']} and {paths['csv']}")
    return rows


if __name__ == "__main__":
    main()
