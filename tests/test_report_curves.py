"""`mtl report`: the learning-curve panels show the noise of validation accuracy."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer

from metatransfer.report import min_span, render


def test_val_axis_spans_at_least_five_points():
    assert min_span(60.0, 60.25) == (57.625, 62.625)
    assert min_span(0.0, 1.0) == (0.0, 5.0) and min_span(99.0, 100.0) == (95.0, 100.0)
    assert min_span(40.0, 70.0) == (40.0, 70.0)


def test_report_renders_val_accuracy_with_its_ci(tmp_path, monkeypatch):
    rows = [{"phase": phase, "step": step, "loss": 1.0 / step, "val_acc": 60 + 0.1 * step,
             "val_ci95": 0.9} for phase in ("pretrain", "meta") for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    assert [p.name for p in render(tmp_path)] == ["learning_curves.png"]
    (fig,) = figures
    val_panels = [ax for ax in fig.axes if "val accuracy" in ax.get_title()]
    assert len(val_panels) == 2  # pre-training and meta-training
    for ax in val_panels:
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        line, _, (ranges,) = bars
        assert list(line.get_ydata()) == pytest.approx([60.1, 60.2, 60.3])
        half_widths = [(top[1] - bottom[1]) / 2 for bottom, top in ranges.get_segments()]
        assert half_widths == pytest.approx([0.9] * 3)  # each epoch's 95% CI
        low, high = ax.get_ylim()
        assert high - low >= 5.0  # a 0.2-point drift is not drawn as a steep curve
    plt.close(fig)


def test_benchmark_over_seeds_draws_each_seeds_run(tmp_path, monkeypatch):
    """`accuracy.py --seeds` writes seed-N/<variant>/ runs: one curve per seed, and a phase
    that ran no epoch (an adopted ImageNet network) says so instead of an empty panel."""
    for seed in (0, 1):
        rows = [{"phase": "meta", "step": 0, "val_acc": 50.0}] + [
            {"phase": "meta", "step": s, "loss": 1.0 / s, "val_acc": 70 + seed + s}
            for s in (1, 2)]
        run = tmp_path / f"seed-{seed}" / "mtl+ht"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert [p.name for p in render(tmp_path)] == ["learning_curves.png"]
    (fig,) = figures
    (meta_val,) = [ax for ax in fig.axes if ax.get_title().startswith("meta-training: val")]
    assert sorted(t.get_text() for t in meta_val.get_legend().get_texts()) == \
        ["mtl+ht, seed-0", "mtl+ht, seed-1"]
    curves = sorted(list(c[0].get_ydata()) for c in meta_val.containers
                    if isinstance(c, ErrorbarContainer))
    assert curves == [[50.0, 71.0, 72.0], [50.0, 72.0, 73.0]]
    pre = [ax for ax in fig.axes if ax.get_title().startswith("pre-training")]
    assert all(t.get_text() == "no epochs of this phase" for ax in pre for t in ax.texts)
    assert all(ax.texts for ax in pre)
    plt.close(fig)
