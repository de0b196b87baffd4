"""Figures for ``moeq bench``: one bar chart per metric, and perplexity against bits (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_plots(results: list[dict], cols, out: Path, label, value) -> list[str]:
    """Write bar_<metric>.png per column and ppl_vs_bits.png; -> file names."""
    plt = _plt()
    files = []
    names = [label(r) for r in results]
    for header, kind, key in cols:
        vals = [value(r, kind, key) for r in results]
        if all(v is None for v in vals):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.2))
        ax.bar(range(len(names)), [v if v is not None else 0 for v in vals], color="#4477aa")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(header)
        if kind == "ppl":
            fp = next((v for r, v in zip(results, vals) if r["method"] == "fp" and v), None)
            if fp:
                ax.axhline(fp, color="gray", ls="--", lw=0.8)
        fig.tight_layout()
        fn = f"bar_{key}.png"
        fig.savefig(out / fn, dpi=120)
        plt.close(fig)
        files.append(fn)
    ppl_cols = [(h, k, key) for h, k, key in cols if k == "ppl"]
    if ppl_cols:
        fig, axes = plt.subplots(1, len(ppl_cols), figsize=(4.2 * len(ppl_cols), 3.2), squeeze=False)
        for ax, (h, k, key) in zip(axes[0], ppl_cols):
            methods = sorted({r["method"] for r in results if r["method"] != "fp"})
            for m in methods:
                pts = sorted((r["avg_bits"], value(r, k, key)) for r in results if r["method"] == m
                             and value(r, k, key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
            fp = next((value(r, k, key) for r in results if r["method"] == "fp"), None)
            if fp:
                ax.axhline(fp, color="gray", ls="--", lw=0.8, label="FP")
            ax.set_xlabel("average bits")
            ax.set_ylabel(h)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_bits.png", dpi=120)
        plt.close(fig)
        files.append("ppl_vs_bits.png")
    return files
