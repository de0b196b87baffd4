"""Figures of a profile and of a bits/perplexity trade-off (matplotlib, Agg backend, PNG files).

``profile_plots`` draws: expert usage per layer as a heatmap (share of the uniform 1/E load, with the
calibration set's expert-balance std in the title), the outlier score of every routed-expert linear
(one heatmap per projection, gate/up/down), the block-importance score per block (1 - cos, predicted
and measured), and the summed sensitivity per role at each candidate width. ``pareto_plot`` draws
perplexity against average bits for named series of points.
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path.name


def usage_heatmap(profile, path: Path) -> str:
    plt = _plt()
    blocks = sorted(profile.usage)
    E = profile.num_experts
    rows = []
    for b in blocks:
        c = profile.usage[b]
        tot = sum(c) or 1
        rows.append([x * E / tot for x in c])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * E + 2), 0.45 * len(blocks) + 1.6))
    im = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    ax.set_title(f"expert usage (x uniform share); balance std {profile.balance_std:.4f}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def outlier_heatmaps(profile, path: Path) -> str:
    plt = _plt()
    recs = [r for r in profile.modules if r.role == "expert" and r.name in profile.outlier]
    projs = list(dict.fromkeys(r.proj for r in recs))
    blocks = sorted({r.block for r in recs})
    fig, axes = plt.subplots(1, len(projs), figsize=(4.2 * len(projs), 0.45 * len(blocks) + 1.8), squeeze=False)
    for ax, proj in zip(axes[0], projs):
        grid = [[float("nan")] * profile.num_experts for _ in blocks]
        for r in recs:
            if r.proj == proj:
                grid[blocks.index(r.block)][r.expert] = profile.outlier[r.name]
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_title(f"outlier score: {proj}", fontsize=9)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def importance_bars(profile, path: Path) -> str:
    plt = _plt()
    blocks = sorted(profile.importance)
    pred = [profile.importance[b]["score"] for b in blocks]
    meas = [1 - profile.importance[b]["measured_cos"] for b in blocks]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(blocks) + 2), 3.2))
    x = range(len(blocks))
    ax.bar([i - 0.2 for i in x], pred, width=0.4, label="predicted 1 - cos", color="#4477aa")
    ax.bar([i + 0.2 for i in x], meas, width=0.4, label="measured 1 - cos", color="#ccbb44")
    ax.set_xticks(list(x), [str(b) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("importance (1 - cos(x, y))")
    ax.legend(fontsize=8)
    return _save(fig, path)


def sensitivity_lines(profile, path: Path) -> str:
    plt = _plt()
    roles = list(dict.fromkeys(r.role for r in profile.modules))
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for role in roles:
        names = [r.name for r in profile.modules if r.role == role]
        ys = [sum(profile.sensitivity[n][b] for n in names) for b in profile.candidates]
        ax.plot(profile.candidates, ys, marker="o", label=role)
    ax.set_yscale("log")
    ax.set_xlabel("bits")
    ax.set_ylabel("summed sensitivity (predicted KL, nats/token)" if profile.block_gain
                  else "summed sensitivity (error per token)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def profile_plots(profile, out_dir: str | Path) -> list[str]:
    """Write every figure the profile has data for into ``out_dir``; -> file names."""
    out = Path(out_dir)
    files = []
    if profile.usage:
        files.append(usage_heatmap(profile, out / "expert_usage.png"))
    if profile.outlier:
        files.append(outlier_heatmaps(profile, out / "outlier_scores.png"))
    if profile.importance:
        files.append(importance_bars(profile, out / "block_importance.png"))
    if profile.sensitivity:
        files.append(sensitivity_lines(profile, out / "sensitivity.png"))
    return files


def pareto_plot(series: dict[str, list[tuple[float, float, str]]], path: str | Path, ylabel: str = "perplexity",
                title: str = "") -> str:
    """series: name -> [(avg bits, value, point label)]; one marker style per series, lines for sorted series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^v<>P*X"
    for k, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-" if name != "heuristics" else "none",
                label=name)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average bits")
    ax.set_ylabel(ylabel)
    ys = [p[1] for pts in series.values() for p in pts]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 3:  # log only when the values span a wide range
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
