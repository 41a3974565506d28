"""Plots of evaluation results (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def running_ppl(curves: dict[str, list[float]], slice_tokens: int, path: Path, title: str, trained: int | None = None):
    """Perplexity of consecutive slices vs tokens, one line per method (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for method, values in curves.items():
        xs = [(i + 1) * slice_tokens for i in range(len(values))]
        ax.plot(xs, values, label=method, linewidth=1.4)
    if trained:
        ax.axvline(trained, color="grey", linestyle=":", label=f"trained length {trained}")
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"perplexity of each {slice_tokens}-token slice")
    _finish(fig, ax, path, title)


def sink_bars(rows: list[dict], path: Path, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['start_size']}+{r['recent_size']}" for r in rows]
    bars = ax.bar(labels, [r["ppl"] for r in rows], color=["#c44" if r["start_size"] == 0 else "#48c" for r in rows])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xlabel("sinks + recent tokens")
    ax.set_ylabel("perplexity")
    _finish(fig, ax, path, title, legend=False)


def cache_size_curve(rows: list[dict], path: Path, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["cache_size"] for r in rows]
    ax.plot(xs, [r["streaming_ppl"] for r in rows], marker="o", label="streaming (4 sinks + window)")
    ax.plot(xs, [r["window_ppl"] for r in rows], marker="s", label="window (no sinks)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("total cache (tokens)")
    ax.set_ylabel("perplexity")
    _finish(fig, ax, path, title)


def recall_curve(table: list[dict], path: Path, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in table:
        label = row["method"] if row["method"] == "dense" else f"{row['method']} window {row['window']}"
        series.setdefault(label, []).append((row["distance"], row["accuracy"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for window in sorted({r["window"] for r in table if r["method"] != "dense"}):
        ax.axvline(window, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tokens between the fact and the question")
    ax.set_ylabel("accuracy")
    _finish(fig, ax, path, title)


def stability_plot(rows: list[dict], path: Path, title: str):
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    xs = [r["to_token"] for r in rows]
    top.plot(xs, [r["ppl"] for r in rows], marker="o")
    top.set_ylabel("perplexity per slice")
    top.grid(alpha=0.3)
    bottom.plot(xs, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label="cache")
    gpu = [r.get("gpu_peak_mib") for r in rows]
    if all(g is not None for g in gpu):
        bottom.plot(xs, gpu, marker="s", label="GPU peak allocated")
    else:
        bottom.plot(xs, [r["rss_mib"] for r in rows], marker="s", label="process RSS")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("tokens streamed")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_families(table: list[dict], path: Path, title: str):
    """Accuracy vs distance, one panel per fact family, one line per method, Wilson 95% intervals as bars."""
    plt = _pyplot()
    families = list(dict.fromkeys(r["family"] for r in table))
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.5), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families, strict=True):
        rows = [r for r in table if r["family"] == family]
        for method in dict.fromkeys(r["method"] for r in rows):
            line = sorted((r for r in rows if r["method"] == method), key=lambda r: r["distance"])
            y = [r["accuracy"] for r in line]
            err = [[a - r["ci_low"] for a, r in zip(y, line, strict=True)],
                   [r["ci_high"] - a for a, r in zip(y, line, strict=True)]]  # fmt: skip
            ax.errorbar([r["distance"] for r in line], y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("tokens between the fact and the question")
        ax.set_title(family)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy (Wilson 95% interval)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
