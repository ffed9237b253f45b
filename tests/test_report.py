"""`mtl report` draws the accuracy plot from results.json alone, with or without the paired
comparisons (results.json files written before comparisons existed still render)."""

from __future__ import annotations

import json

import pytest

from metatransfer.report import render

ROWS = [{"method": m, "ways": 5, "shots": 1, "queries": 15, "episodes": 600,
         "accuracy": acc, "ci95": 0.5} for m, acc in (("mtl", 61.0), ("ft", 60.0))]
COMPARISONS = [{"a": "mtl", "b": "ft", "ways": 5, "shots": 1, "episodes": 600, "diff": 1.0,
                "ci95": 0.2, "significant": True}]


@pytest.mark.parametrize("comparisons", [None, COMPARISONS])
def test_accuracy_plot_with_and_without_comparisons(tmp_path, comparisons):
    results = {"dataset": "toy", "split": "test", "results": ROWS}
    if comparisons is not None:
        results["comparisons"] = comparisons
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert render(tmp_path) == [tmp_path / "accuracy.png"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
