"""``mtl report RUN_DIR``: learning curves and accuracy plots from a run's own records.

Everything is rendered from ``metrics.jsonl`` and ``results.json``, so a report can be
rebuilt at any time from any run directory (or a benchmark folder of several runs).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MTLError
from .results import ONE_NETWORK, selection_sentence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def min_span(lo: float, hi: float, span: float = 5.0) -> tuple[float, float]:
    """An axis range of at least ``span`` points around ``lo..hi`` (within 0-100), so that
    a 0.25-point wobble between epochs is not drawn as a steep curve."""
    if hi - lo >= span:
        return lo, hi
    mid = (lo + hi) / 2
    lo, hi = max(0.0, mid - span / 2), min(100.0, mid + span / 2)
    return (lo, lo + span) if lo == 0.0 else (hi - span, hi) if hi == 100.0 else (lo, hi)


def plot_learning_curves(runs: dict[str, Path], out: Path) -> Path | None:
    """Loss and val accuracy per epoch for pre-training and meta-training (one PNG)."""
    records = {name: read_metrics(path) for name, path in runs.items()}
    if not any(records.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, phase in enumerate(("pretrain", "meta")):
        if not any(r["phase"] == phase for rows in records.values() for r in rows):
            for ax in axes[:, col]:  # e.g. an adopted ImageNet network: nothing to draw
                ax.text(0.5, 0.5, "no epochs of this phase", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
        for name, rows in records.items():
            rows = [r for r in rows if r["phase"] == phase]
            if not rows:
                continue
            epochs = [r["step"] for r in rows]
            trained = [r for r in rows if "loss" in r]  # epoch 0 (the start) has no loss
            axes[0, col].plot([r["step"] for r in trained], [r["loss"] for r in trained],
                              marker="o", label=name)
            ci = [r.get("val_ci95", 0.0) for r in rows]  # so that noise does not look a trend
            axes[1, col].errorbar(epochs, [r["val_acc"] for r in rows], yerr=ci, marker="o",
                                  capsize=3, label=name)
        axes[1, col].set_ylim(*min_span(*axes[1, col].get_ylim()))
        title = "pre-training" if phase == "pretrain" else "meta-training"
        axes[0, col].set_title(f"{title}: train loss")
        axes[1, col].set_title(f"{title}: val accuracy (%), 95% CI")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(results: dict, out: Path) -> Path | None:
    """Accuracy with 95% CI bars per method, grouped by (ways, shots); below it, when the
    results have ``comparisons``, the paired differences (the panel that says who wins)."""
    rows = results.get("results", [])
    if not rows:
        return None
    plt = _pyplot()
    comparisons = results.get("comparisons", [])
    settings = list(dict.fromkeys((r["ways"], r["shots"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["ways"], r["shots"]): r for r in rows}
    width = 0.8 / len(methods)
    width_in = max(6, 1.6 * len(settings) * max(1, len(methods) / 3))
    if comparisons:
        fig, (ax, diff_ax) = plt.subplots(
            2, 1, figsize=(width_in, 5 + 0.3 * len(comparisons)),
            gridspec_kw={"height_ratios": [4, 1 + 0.3 * len(comparisons)]})
        plot_differences(diff_ax, comparisons)
    else:
        fig, ax = plt.subplots(figsize=(width_in, 4))
    for i, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, (ways, shots) in enumerate(settings):
            r = cell.get((method, ways, shots))
            if r:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(r["accuracy"])
                errs.append(r["ci95"])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=method)
    ax.set_xticks(range(len(settings)), [f"{w}-way {s}-shot" for w, s in settings])
    lows = [r["accuracy"] - r["ci95"] for r in rows]
    ax.set_ylim(max(0, min(lows) - 10), min(100, max(r["accuracy"] + r["ci95"] for r in rows) + 3))
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_title(f"{results.get('dataset', '')} ({results.get('split', '')} split)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(methods), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.1), frameon=False)
    notes = selection_notes(results)
    # which epoch selection kept, in words (mtl = ft said outright), in a strip of its own
    # below the axes: tight_layout lays the axes out above it
    strip = (0.13 * len(notes) + 0.1) / fig.get_figheight() if notes else 0.0
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, strip, 1, 1))
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def selection_notes(results: dict) -> list[str]:
    """What selection kept: ``results["selection"]`` of one run, or ``"selections"`` of a
    benchmark (``{variant: record}`` or ``{variant: {seed: record}}``)."""
    if results.get("selection"):
        return [selection_sentence(results["selection"])]
    notes = []
    for variant, record in (results.get("selections") or {}).items():
        per_seed = record if "selected_epoch" not in record else {"": record}
        for seed, one in per_seed.items():
            label = f"{variant}" + (f", seed {seed}" if seed != "" else "")
            notes.append(f"{label}: {selection_sentence(one)}")
    return notes


def plot_differences(ax, comparisons: list[dict]) -> None:
    """Each paired difference as a point with its 95% CI bar around a 0 line. Of one run:
    filled when the CI excludes 0. Over training seeds (a benchmark's ``per_seed``) the bar
    is the experiment's interval over seeds and episodes (its ``ci_method``), filled when
    the claim holds, each seed's own difference a small grey mark; a ``one network``
    comparison (neither side changes with the seed) is a square, filled when its episode
    CI excludes 0, and says so in its label."""
    for y, c in enumerate(comparisons):
        color = "tab:green" if c["diff"] > 0 else "tab:red"
        for value in c.get("per_seed") or []:
            ax.plot(value, y + 0.18, marker="|", color="grey", markersize=7)
        one_network = c.get("scope") == ONE_NETWORK
        filled = c["significant"] if one_network or "holds" not in c else c["holds"]
        ax.errorbar(c["diff"], y, xerr=c["ci95"] or 0.0, fmt="s" if one_network else "o",
                    capsize=3, color=color, markerfacecolor=color if filled else "white")
    ax.axvline(0, color="black", linewidth=0.8)
    labels = [f"{c['a']} − {c['b']}, {c['ways']}-way {c['shots']}-shot"
              + (" (one network)" if c.get("scope") == ONE_NETWORK else "")
              for c in comparisons]
    ax.set_yticks(range(len(comparisons)), labels, fontsize=8)
    ax.set_ylim(len(comparisons) - 0.5, -0.5)  # first comparison on top
    seeds = max((len(c.get("per_seed") or []) for c in comparisons), default=0)
    methods = list(dict.fromkeys(c["ci_method"] for c in comparisons
                                 if c.get("ci_method") and c.get("scope") != ONE_NETWORK))
    ax.set_xlabel("paired difference (points), 95% CI; filled: CI excludes 0" if not seeds else
                  f"paired difference (points): mean over {seeds} seeds (grey: each seed),\n"
                  f"95% CI over seeds and episodes ({'; '.join(methods) or 'episode CI'});"
                  " filled: the claim holds", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def render(folder: str | Path) -> list[Path]:
    """Write the plots for a run directory or a benchmark folder of runs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MTLError(f"{folder} is not a directory; give a run directory")
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs = {"run": folder} if (folder / "metrics.jsonl").is_file() else {}
    runs.update({p.name: p for p in sorted(folder.iterdir())
                 if p.is_dir() and (p / "metrics.jsonl").is_file()})
    # a benchmark over seeds: seed-N/<variant>/ (each seed's runs, one curve each)
    runs.update({f"{p.name}, {seed.name}": p for seed in sorted(folder.glob("seed-*"))
                 if seed.is_dir() for p in sorted(seed.iterdir())
                 if p.is_dir() and (p / "metrics.jsonl").is_file()})
    if not results and not runs:
        raise MTLError(f"{folder} has neither results.json nor metrics.jsonl; nothing to plot")
    written = [plot_learning_curves(runs, folder), plot_accuracy(results, folder)]
    return [p for p in written if p is not None]
