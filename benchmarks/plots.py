"""The throughput plot: time relative to the frozen linear, per shape and mode, over the token count.

One panel per (mode, shape); one colour per provider; solid lines at the smallest rank of the run, dashed at
the largest (rank-independent providers, full FT and the frozen linear, are solid). The frozen linear is the
line at 1. Written atomically (temporary file, then rename) with matplotlib's Agg backend, so it works on
machines without a display.
"""
from __future__ import annotations

import io
from pathlib import Path

from qrlora_kernels.atomic_file import atomic_write_bytes


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("ratio_vs_frozen") is not None]


def plot_layers(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """Write the PNG for ``rows`` (as made by ``benchmarks.throughput``) to ``path``; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(rows)
    if not rows:
        raise ValueError("no measured row to plot (every case failed or was skipped)")
    modes = sorted({r["mode"] for r in rows})
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    shown_ranks = sorted({ranks[0], ranks[-1]}) if ranks else []
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}

    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(max(5.0, 4.2 * len(shapes)), 3.4 * len(modes)),
                             squeeze=False, sharex=True)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for provider in providers:
                for rank in ([None] if provider in ("full_ft", "frozen_linear") else shown_ranks):
                    pts = sorted((r["tokens"], r["ratio_vs_frozen"]) for r in rows
                                 if r["mode"] == mode and r["shape"] == shape and r["provider"] == provider
                                 and r["rank"] == rank)
                    if not pts:
                        continue
                    label = provider if rank is None else f"{provider} r={rank}"
                    dashed = rank is not None and len(shown_ranks) > 1 and rank == shown_ranks[-1]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours[provider],
                            linestyle="--" if dashed else "-", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape} (out x in), {mode}", fontsize=9)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel("time / frozen linear")
            if i == len(modes) - 1:
                ax.set_xlabel("tokens T")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    where = ""
    if meta:
        device = meta.get("gpu") or f"CPU ({meta.get('cpu')}, {meta.get('cpu_threads')} threads)"
        where = f"\n{device}, {meta.get('date', '')}, commit {meta.get('git_commit', '?')}"
    fig.suptitle(f"Layer time relative to the frozen linear{where}", fontsize=9)
    fig.tight_layout()

    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, png.getvalue())
    return path
