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

Writes ``benchmarks/results/<device>/qr.{json,csv}`` (or ``--out-dir``). On a shared CPU the BLAS thread
pools of torch (OpenMP) and scipy (OpenBLAS) spin after each call; a short pause between routines keeps
one pool's spinning from being billed to the next routine, and repetitions are interleaved.

On CUDA (``sequential``) each routine is timed on its own: every sample is ONE call between CUDA events
(synchronised before and after; no pause, no L2 flush: a 64 MB matrix does not fit the L2 anyway), at most
``--routine-budget`` seconds of samples per routine (at least 3), the baselines (``torch.linalg.qr``,
``torch.geqrf``, the SVD, cupy) first, so that a CUDA error in ``qrcp`` that poisons the context cannot take
them out; a routine that raises gives an error row; the result files are rewritten after every routine,
so a run killed part-way keeps what it measured. The issue's bars for the device measured are checked from the
rows, printed (labelled CPU or GPU) and stored in the JSON's meta as ``bars``: on a GPU ``GPU_BARS`` (full
QRCP <= 3x ``torch.linalg.qr``, randomized <= 1.5x, both >= 20x faster than the SVD), on the CPU ``CPU_BARS``
(full QRCP <= scipy's geqp3, rank 64 <= 0.1x scipy's full geqp3, randomized compact <= 1.5x ``torch.geqrf``).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.harness import RESULTS_DIR, environment, format_table, measure, positive_int, write_results

QUICK_SIZES = [(1024, 1024), (2048, 2048)]
FULL_SIZES = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008)]
TRUNCATED_RANKS = (64, 256)
POOL_PAUSE_S = 0.5
# Timed first when routines run one after another (CUDA): the floor and the references the bars need.
BASELINES = ("linalg_qr", "geqrf", "svd", "cupy_qr", "scipy_geqp3")
MIN_SAMPLES = 3
# The bars: (routine, reference, the largest allowed time ratio routine / reference). On a GPU:
GPU_BARS = (("qrcp_geqp3", "linalg_qr", 3.0), ("qrcp_randomized", "linalg_qr", 1.5),
            ("qrcp_geqp3", "svd", 1 / 20), ("qrcp_randomized", "svd", 1 / 20))
# On the CPU (randomized "full QRCP" against geqrf: both compact, neither forms Q):
CPU_BARS = (("qrcp_geqp3", "scipy_geqp3", 1.0), ("qrcp_geqp3_rank64", "scipy_geqp3", 0.1),
            ("qrcp_randomized_raw", "geqrf", 1.5))
TABLE_COLUMNS = ["m", "n", "routine", "status", "median_ms", "p20_ms", "p80_ms", "reps", "cpu_ms", "vs_scipy_geqp3",
                 "vs_geqrf", "vs_linalg_qr", "vs_svd", "cpu_vs_scipy_geqp3", "cpu_vs_geqrf"]


def parse_size(text: str) -> tuple[int, int]:
    """``2048`` (square) or ``4096x11008``: positive sizes, nothing else ("64x" was read as 64x64)."""
    found = re.fullmatch(r"\s*([1-9][0-9]*)(?:\s*[xX]\s*([1-9][0-9]*))?\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"sizes are N or MxN with positive M, N (e.g. 2048 or 4096x11008), "
                                         f"got {text!r}")
    return int(found.group(1)), int(found.group(2) or found.group(1))


def _size_list(text: str) -> list[tuple[int, int]]:
    return [parse_size(item) for item in text.split(",")]


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
        except ImportError:
            cupy = None
        if cupy is not None:
            try:
                A_cp = cupy.asarray(A)
                out["cupy_qr"] = lambda: cupy.linalg.qr(A_cp)
            except Exception as exc:  # an unusable cupy gives its own error row, not a lost size
                def unusable(exc=exc):
                    raise RuntimeError(f"cupy could not take the matrix: {type(exc).__name__}: {exc}")
                out["cupy_qr"] = unusable
    return out


def ordered(plan: dict) -> dict:
    """The baselines first, then the rest in their own order."""
    first = {name: plan[name] for name in BASELINES if name in plan}
    return first | {name: fn for name, fn in plan.items() if name not in first}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_one_call(fn: Callable[[], object], device) -> float:
    """Milliseconds of ONE call: CUDA events around it on a GPU (synchronised first, so no earlier work is
    billed to it), wall clock on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    return measure(fn, device=device, warmup=0, reps=1).median_ms


def _summary_row(m, n, dtype, name, wall, cpu, device) -> dict:
    w = sorted(wall)
    return {"m": m, "n": n, "dtype": str(dtype).replace("torch.", ""), "routine": name, "status": "ok",
            "median_ms": statistics.median(w), "p20_ms": w[int(0.2 * (len(w) - 1))],
            "p80_ms": w[round(0.8 * (len(w) - 1))], "reps": len(w),
            "cpu_ms": statistics.median(cpu) if cpu and torch.device(device).type == "cpu" else None}


def _failed_row(m, n, dtype, name, status, note) -> dict:
    return {"m": m, "n": n, "dtype": str(dtype).replace("torch.", ""), "routine": name, "status": status,
            "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "cpu_ms": None, "note": note}


def add_ratios(rows: list[dict]) -> None:
    """vs_<reference>: median over the reference's median at the same size, both from this run."""
    for row in rows:
        same = {r["routine"]: r for r in rows if (r["m"], r["n"]) == (row["m"], row["n"])
                and r.get("median_ms") is not None}
        for ref in ("scipy_geqp3", "geqrf", "linalg_qr", "svd"):
            ok = ref in same and row.get("median_ms") is not None
            row[f"vs_{ref}"] = row["median_ms"] / same[ref]["median_ms"] if ok else None
            if ref in ("scipy_geqp3", "geqrf"):
                both = ok and row.get("cpu_ms") is not None and same[ref].get("cpu_ms")
                row[f"cpu_vs_{ref}"] = row["cpu_ms"] / same[ref]["cpu_ms"] if both else None


def bar_checks(rows: list[dict], *, on_gpu: bool) -> list[dict]:
    """The issue's bars for rows measured on a GPU or on the CPU, per size where both routines were measured:
    kind ("GPU" or "CPU"), ratio, bar, met."""
    bars, kind = (GPU_BARS, "GPU") if on_gpu else (CPU_BARS, "CPU")
    checks = []
    for m, n in dict.fromkeys((r["m"], r["n"]) for r in rows):
        same = {r["routine"]: r for r in rows if (r["m"], r["n"]) == (m, n) and r.get("median_ms") is not None}
        for routine, ref, limit in bars:
            if routine in same and ref in same:
                ratio = same[routine]["median_ms"] / same[ref]["median_ms"]
                bar = f">= {1 / limit:g}x faster" if ref == "svd" else f"<= {limit:g}x"
                checks.append({"kind": kind, "size": f"{m}x{n}", "check": f"{routine} / {ref}", "ratio": ratio,
                               "bar": bar, "met": ratio <= limit})
    return checks


def format_bars(checks: list[dict]) -> str:
    if not checks:
        return "issue's bars: not checkable (a routine or its reference was not measured)"
    return "\n".join(f"{c['kind']} bar {c['size']}: {c['check']} = {c['ratio']:.3g} ({c['bar']}): "
                     f"{'MET' if c['met'] else 'NOT MET'}" for c in checks)


def run(sizes, *, device: str = "cpu", dtype=torch.float32, reps: int = 3, warmup: int = 1,
        only: set[str] | None = None, progress: bool = True, sequential: Optional[bool] = None,
        routine_budget_s: Optional[float] = None, time_budget_s: Optional[float] = None,
        on_rows: Optional[Callable[[list], None]] = None) -> list[dict]:
    """Time every routine at every size; returns rows with medians and same-run ratios.

    Interleaved (the CPU default): repetitions go A B C, A B C, ... so that the load of a shared machine falls
    on every routine alike; each row also carries the median process CPU time, which descheduling by other
    users does not inflate. Sequential (the CUDA default, see the module docstring): one routine after the
    other, baselines first, ``reps`` one-call samples each within ``routine_budget_s``; routines not started
    within ``time_budget_s`` get a "not run" row. Either way a routine that raises gives an error row, and
    ``on_rows(rows)`` (ratios filled in) is called after every routine, to write the results as they come.
    """
    from tqdm import tqdm

    sequential = torch.device(device).type == "cuda" if sequential is None else sequential
    rows: list[dict] = []
    started = time.perf_counter()

    def publish():
        add_ratios(rows)
        if on_rows is not None:
            on_rows(rows)

    bar = tqdm(total=len(sizes), desc="qr benchmark", disable=not progress)
    for m, n in sizes:
        A = torch.randn(m, n, dtype=dtype, device=device)
        try:
            plan = {name: fn for name, fn in routines(A).items()
                    if only is None or name in only or any(name.startswith(o) for o in only)}
        except Exception as exc:  # e.g. cupy present but unusable: nothing of this size can run
            rows.append(_failed_row(m, n, dtype, "routines", "error", f"{type(exc).__name__}: {exc}"[:300]))
            publish()
            continue
        if sequential:
            plan = ordered(plan)
            for name, fn in plan.items():
                if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                    rows.append(_failed_row(m, n, dtype, name, "not run", f"time budget of {time_budget_s:g} s spent"))
                    continue
                bar.set_postfix_str(f"{m}x{n} {name}")
                wall: list[float] = []
                try:
                    for _ in range(warmup):
                        fn()
                    _sync(device)
                    t0 = time.perf_counter()
                    while len(wall) < reps and (len(wall) < MIN_SAMPLES or routine_budget_s is None
                                                or time.perf_counter() - t0 < routine_budget_s):
                        wall.append(time_one_call(fn, device))
                    rows.append(_summary_row(m, n, dtype, name, wall, [], device))
                except Exception as exc:  # one failing routine must not lose the table
                    note = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(_failed_row(m, n, dtype, name, "error", note))
                    print(f"qr benchmark: {name} at {m}x{n} failed: {note}", flush=True)
                publish()
        else:
            wall = {name: [] for name in plan}
            cpu = {name: [] for name in plan}
            failed: dict[str, str] = {}
            for name, fn in plan.items():
                bar.set_postfix_str(f"{m}x{n} warm-up {name}")
                try:
                    for _ in range(warmup):
                        fn()
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"[:300]
            for rep in range(reps):
                for name, fn in plan.items():
                    if name in failed:
                        continue
                    bar.set_postfix_str(f"{m}x{n} rep {rep + 1}/{reps} {name}")
                    time.sleep(POOL_PAUSE_S)
                    c0 = time.process_time()
                    try:
                        wall[name].append(time_one_call(fn, device))
                    except Exception as exc:
                        failed[name] = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    cpu[name].append((time.process_time() - c0) * 1e3)
            for name in plan:
                rows.append(_failed_row(m, n, dtype, name, "error", failed[name]) if name in failed
                            else _summary_row(m, n, dtype, name, wall[name], cpu[name], device))
            publish()
        bar.update(1)
    bar.close()
    add_ratios(rows)
    return rows


def results_writer(out_dir: Path, name: str, meta: dict) -> Callable[[list], None]:
    """``on_rows`` for ``run``: rewrite ``<name>.{json,csv}`` (atomically) with the bars in the meta."""
    def write(rows):
        write_results(name, rows, meta | {"bars": bar_checks(rows, on_gpu=bool(meta.get("gpu")))}, out_dir)
    return write


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_size_list, help="comma list: 2048 or 4096x11008 (default: the quick CPU set)")
    parser.add_argument("--full", action="store_true", help="all sizes of the issue (slow on the CPU)")
    parser.add_argument("--quick", action="store_true", help="the quick set (default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=positive_int, default=None, help="samples per routine (default 3; 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int,
                        help="CPU threads for every routine alike (torch's OpenMP/MKL and scipy's OpenBLAS)")
    parser.add_argument("--routines", help="comma list of routine names or prefixes (default: all)")
    parser.add_argument("--out", default="qr", help="result file stem")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default benchmarks/results/<device type>)")
    parser.add_argument("--routine-budget", type=float, default=None,
                        help="seconds of samples per routine when timed one after another (CUDA; default 4)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; routines not started by then are reported as not run (CUDA)")
    args = parser.parse_args(argv)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as err:
        parser.error(f"--device {args.device!r}: {err}")
    sizes = args.sizes or (FULL_SIZES if args.full else QUICK_SIZES)
    only = set(args.routines.split(",")) if args.routines else None
    if only is not None:
        # Checked before anything runs: a typo ran nothing, exited 0 and rewrote the results with no rows.
        side = max(TRUNCATED_RANKS)  # large enough for every routine (the truncated ones need min(m, n) >= r)
        known = list(routines(torch.zeros(side, side, device=args.device)))
        unknown = sorted(o for o in only if not any(name == o or name.startswith(o) for name in known))
        if unknown:
            parser.error(f"--routines: unknown {', '.join(map(repr, unknown))}; routines here: {', '.join(known)}")
    torch.manual_seed(0)
    limits = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(limits=args.threads)
    cuda = torch.device(args.device).type == "cuda"
    meta = {**environment(args.device), "threads": args.threads or torch.get_num_threads(),
            "timing_method": ("one call per sample between CUDA events, routines one after another, baselines first"
                              if cuda else "wall clock, one call per sample, repetitions interleaved")}
    out_dir = args.out_dir or RESULTS_DIR / torch.device(args.device).type
    writer = results_writer(out_dir, args.out, meta)
    with limits:
        rows = run(sizes, device=args.device, reps=args.reps or (10 if cuda else 3), warmup=args.warmup, only=only,
                   routine_budget_s=args.routine_budget if args.routine_budget is not None else (4.0 if cuda else None),
                   time_budget_s=args.time_budget, on_rows=writer, progress=not cuda)
    writer(rows)
    print(format_table(rows, TABLE_COLUMNS))
    print(format_bars(bar_checks(rows, on_gpu=cuda)))
    print(f"wrote {out_dir / (args.out + '.json')} and {out_dir / (args.out + '.csv')}")
    return rows


if __name__ == "__main__":
    main()
