"""`mtl report` draws the accuracy plot from results.json alone, with or without the paired
comparisons (results.json files written before comparisons existed still render)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from metatransfer.report import render

ROWS = [{"method": m, "ways": 5, "shots": 1, "queries": 15, "episodes": 600,
         "accuracy": acc, "ci95": 0.5} for m, acc in (("mtl", 61.0), ("ft", 60.0))]
COMPARISONS = [{"a": "mtl", "b": "ft", "ways": 5, "shots": 1, "episodes": 600, "diff": 1.0,
                "ci95": 0.2, "significant": True}]


@pytest.mark.parametrize("comparisons", [None, COMPARISONS])
def test_accuracy_plot_with_and_without_comparisons(tmp_path, comparisons, monkeypatch):
    results = {"dataset": "toy", "split": "test", "results": ROWS}
    if comparisons is not None:
        results["comparisons"] = comparisons
    (tmp_path / "results.json").write_text(json.dumps(results))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    assert render(tmp_path) == [tmp_path / "accuracy.png"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    (fig,) = figures
    accuracy = fig.axes[0]
    bars = [c for c in accuracy.containers if isinstance(c, BarContainer)]
    assert [[p.get_height() for p in b.patches] for b in bars] == [[61.0], [60.0]]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["mtl", "ft"]
    if comparisons is None:
        assert len(fig.axes) == 1  # no panel of differences
    else:
        differences = fig.axes[1]
        (point,) = [c for c in differences.containers if isinstance(c, ErrorbarContainer)]
        line, _, (ranges,) = point
        assert list(line.get_xdata()) == [1.0]
        ((left, _), (right, _)), = ranges.get_segments()
        assert (left, right) == pytest.approx((0.8, 1.2))  # the paired 95% CI
        assert line.get_markerfacecolor() != "white"  # filled: the CI excludes 0
        labels = [t.get_text() for t in differences.get_yticklabels()]
        assert labels == ["mtl − ft, 5-way 1-shot"]
    plt.close(fig)
