"""`mtl report`: the learning-curve panels show the noise of validation accuracy."""

from __future__ import annotations

import json

from metatransfer.report import min_span, render


def test_val_axis_spans_at_least_five_points():
    assert min_span(60.0, 60.25) == (57.625, 62.625)
    assert min_span(0.0, 1.0) == (0.0, 5.0) and min_span(99.0, 100.0) == (95.0, 100.0)
    assert min_span(40.0, 70.0) == (40.0, 70.0)


def test_report_renders_val_accuracy_with_its_ci(tmp_path):
    rows = [{"phase": phase, "step": step, "loss": 1.0 / step, "val_acc": 60 + 0.1 * step,
             "val_ci95": 0.9} for phase in ("pretrain", "meta") for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.name for p in render(tmp_path)] == ["learning_curves.png"]
