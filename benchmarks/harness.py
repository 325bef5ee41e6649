"""The one benchmark harness every suite shares.

* ``measure``: median / p20 / p80 after warm-up. On CUDA it uses
  ``triton.testing.do_bench`` (CUDA events, L2 flushed between reps), or
  ``do_bench_cudagraph`` when launch overhead matters; on the CPU, wall-clock.
* ``environment``: GPU name, torch / triton / CUDA versions, date, git commit,
  and the command line, so every result says how it was made.
* ``write_results``: JSON + CSV, written atomically under ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from qrlora_kernels.atomic_file import atomic_write_bytes, atomic_write_text  # noqa: F401  (one writer for all)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 1,
            reps: int = 5, min_time_s: float = 0.0, cuda_graph: bool = False,
            rep_ms: float | None = None) -> Timing:
    """Time ``fn`` and return median / p20 / p80 in milliseconds.

    CPU: ``warmup`` untimed calls, then at least ``reps`` timed calls (more while
    under ``min_time_s``). CUDA: ``triton.testing.do_bench`` with its warm-up and
    L2 flush, or ``do_bench_cudagraph`` when ``cuda_graph`` is set; ``rep_ms``
    (default: triton's) is their timing window, to raise for slow steps so that
    the median is over several of them.
    """
    if torch.device(device).type == "cuda":
        import triton.testing as tt

        window = {} if rep_ms is None else {"rep": rep_ms}
        if cuda_graph:
            with torch.cuda.stream(torch.cuda.Stream()):
                res = tt.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8], **window)
        else:
            res = tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8], **window)
        med, p20, p80 = (float(v) for v in res)
        return Timing(med, p20, p80, reps=-1)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps=len(times))


def positive_int(text: str) -> int:
    """argparse type for counts (--reps, --layers): 0 was silently the default where ``args.x or default`` read it."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _git_commit() -> str:
    """The commit measured, "-dirty" where tracked files other than benchmarks/results differ from it (a run
    rewrites its own committed results before it writes its final meta: that is not a change to what ran)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name and vector extensions where Linux tells them (CPU results and bit patterns depend on
    them: MKL picks its kernels by both), else None."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name")
    if name is None:
        return None
    flags = set(fields.get("flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(vector)})" if vector else name


def environment(device: str | torch.device = "cpu") -> dict:
    """Everything needed to say how and where a result was measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.device(device)
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        cc = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    else:
        gpu, cc = None, None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        # As typed (python -m benchmarks.throughput ...): sys.argv holds the module's file path instead.
        "command": " ".join([Path(sys.executable).name, *getattr(sys, "orig_argv", [None, *sys.argv])[1:]]),
        "device": str(dev),
        "gpu": gpu,
        "compute_capability": cc,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def write_results(name: str, rows: Iterable[dict], meta: dict, out_dir: Path | None = None) -> dict[str, Path]:
    """Write ``<name>.json`` (meta + rows) and ``<name>.csv`` (rows, meta columns prefixed) atomically."""
    rows = list(rows)
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    json_path = out_dir / f"{name}.json"
    csv_path = out_dir / f"{name}.csv"
    atomic_write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return {"json": json_path, "csv": csv_path}


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table for the terminal."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
