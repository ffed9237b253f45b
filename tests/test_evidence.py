"""Evidence that holds: selection apart from the reported classes, per-phase seeds, the kept
epoch on record, tuned baselines (statistics over seeds: test_intervals.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_toy_split, tiny_overrides

from metatransfer.cli import main
from metatransfer.config import DataConfig, load_config, phase_seed
from metatransfer.data.base import selection_mask, selection_share
from metatransfer.results import selection_sentence

pytestmark = pytest.mark.slow  # end-to-end runs of the phases

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_args(out: Path, *extra: str) -> list[str]:
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(out), "amp=off", *extra]:
        args += ["--set", item]
    return args


def test_selection_classes_come_out_of_training_whole_groups():
    names = [f"{a}/character{c:02d}{r}" for a in "ABCDEFGHIJ" for c in range(3)
             for r in ("/rot000", "/rot090")]
    mask = selection_mask(names, 0.2)
    groups = {n.split("/")[0] for n, m in zip(names, mask, strict=True) if m}
    assert len(groups) == 2  # whole alphabets: 2 of 10
    assert all(m == (n.split("/")[0] in groups) for n, m in zip(names, mask, strict=True))
    split = make_toy_split("train")
    rest, chosen = selection_share(split, 0.5)
    assert set(rest.class_names).isdisjoint(chosen.class_names)
    assert sorted(rest.class_names + chosen.class_names) == sorted(split.class_names)
    assert len(chosen.class_names) == 6 and len(rest) + len(chosen) == len(split)
    # the same classes every time: a property of the data, not of the run
    assert selection_share(split, 0.5)[1].class_names == chosen.class_names
    assert DataConfig().selection_holdout == 0.0  # off unless a preset sets it


def test_reported_classes_are_in_no_training_batch_and_no_selection_episode(tmp_path,
                                                                          monkeypatch):
    """With data.selection_holdout, pre-training and meta-training read images of the
    training classes only (selection episodes of the set-apart ones among them), and the
    val split, which is reported, is first touched by meta-test."""
    import metatransfer.embedding as embedding
    import metatransfer.phases.meta_test as meta_test
    import metatransfer.phases.meta_train as meta_train
    import metatransfer.phases.pretrain as pretrain
    from metatransfer.data import transforms

    seen: list[tuple[str, str, set[str]]] = []
    phase = {"now": "pretrain"}

    def spy(split, indices, device):
        names = {split.class_names[c] for c in np.unique(split.labels[indices])}
        seen.append((phase["now"], split.name, names))
        return transforms.gather_uint8(split, indices, device)

    for module in (pretrain, meta_train, embedding):
        monkeypatch.setattr(module, "gather_uint8", spy)
    real_meta_train, real_meta_test = meta_train.meta_train, meta_test.meta_test

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase["now"] = name
            return fn(*args, **kwargs)
        return wrapped

    # `mtl run` imports the phases when it runs: it gets these
    monkeypatch.setattr(meta_train, "meta_train", in_phase("meta", real_meta_train))
    monkeypatch.setattr(meta_test, "meta_test", in_phase("test", real_meta_test))
    out = tmp_path / "run"
    main(run_args(out, "data.selection_holdout=0.5", "eval.split=val", "eval.shots=[1]"))
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "val"
    val_classes = set(make_toy_split("val").class_names)
    train_part, selection = selection_share(make_toy_split("train"), 0.5)
    training = [s for s in seen if s[0] in ("pretrain", "meta")]
    assert training and all(not (names & val_classes) for _, _, names in training)
    assert not any(name.startswith("toy/val") for _, name, _ in training)
    selection_seen = set().union(*(n for _, name, n in training if "selection" in name))
    trained_on = set().union(*(n for _, name, n in training if "selection" not in name))
    assert selection_seen == set(selection.class_names)
    assert trained_on <= set(train_part.class_names) and trained_on.isdisjoint(selection_seen)
    assert any(name.startswith("toy/val") for p, name, _ in seen if p == "test")

    # eval.split=selection: settings can be looked at on the set-apart classes, never val
    seen.clear()
    looked = tmp_path / "looked"
    main(["meta-test", "--quiet", "--checkpoint", str(out), "--out", str(looked),
          "--set", "eval.split=selection"])
    assert json.loads((looked / "results.json").read_text())["split"] == "selection"
    tested = set().union(*(n for p, _, n in seen if p == "test"))
    assert tested and tested <= set(selection.class_names)


def test_phase_seeds_default_to_the_run_seed_and_split_it():
    cfg = load_config(overrides=["seed=7"])
    assert phase_seed(cfg, "pretrain") == phase_seed(cfg, "meta") == 7
    cfg = load_config(overrides=["seed=7", "meta.seed=3"])
    assert (phase_seed(cfg, "pretrain"), phase_seed(cfg, "meta")) == (7, 3)


def test_meta_seed_changes_meta_training_only(tmp_path):
    """One pre-training, two meta-training seeds: the same pre-trained network, other
    meta-trained ones."""
    a, b = tmp_path / "a", tmp_path / "b"
    main(run_args(a, "eval.shots=[1]"))
    main(run_args(b, "eval.shots=[1]", "meta.seed=5"))
    assert (a / "pretrain_best.safetensors").read_bytes() == \
        (b / "pretrain_best.safetensors").read_bytes()
    # (the best trained epochs: selection may keep the same starting network in both)
    assert (a / "meta_best_trained.safetensors").read_bytes() != \
        (b / "meta_best_trained.safetensors").read_bytes()


def test_the_kept_epoch_is_on_record_and_said_when_it_is_the_start(tmp_path, capsys):
    out = tmp_path / "run"
    # lr_ss 0: meta-training cannot beat its start, so selection keeps epoch 0 (mtl = ft)
    main(run_args(out, "eval.shots=[1]", "meta.lr_ss=0"))
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    kept = results["selection"]
    assert kept["selected_epoch"] == 0 and kept["meta_epochs"] == 2
    assert "mtl = ft" in printed and "mtl = ft" in (out / "results.md").read_text()
    ft = next(c for c in results["comparisons"] if (c["a"], c["b"]) == ("mtl", "ft"))
    assert ft["diff"] == 0.0 and ft["ci95"] == 0.0
    assert (out / "meta_best_trained.safetensors").is_file()  # what training gave, kept too
    main(["report", str(out)])
    assert "mtl = ft" in capsys.readouterr().out
    assert "epoch 2 of 2" in selection_sentence({"selected_epoch": 2, "selection_acc": 50.0,
                                                 "meta_epochs": 2})


def test_tuned_baseline_inner_loop_on_selection_classes(tmp_path, capsys):
    out = tmp_path / "run"
    main(run_args(out, "eval.shots=[1]"))
    spec = importlib.util.spec_from_file_location("tune", BENCH / "tune_inner_loop.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    summary = tune.main([str(out), "--steps", "2,5", "--lrs", "0.01,0.5", "--episodes", "8"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    cells = [x for x in lines if "method" in x]
    assert len(cells) == 2 * 4 and {c["method"] for c in cells} == {"mtl", "ft"}
    for method in ("mtl", "ft"):
        best = summary["best"][method]
        mine = [c["accuracy"] for c in cells if c["method"] == method]
        assert best["mean_accuracy"] == pytest.approx(max(mine), abs=0.01)
    assert summary["selection"] == "val"
    # the tuned ft setting is used by meta-test and recorded
    ft = summary["best"]["ft"]
    main(["meta-test", "--checkpoint", str(out), "--out", str(tmp_path / "eval"), "--quiet",
          "--set", f"eval.ft_inner_steps={ft['steps']}", "--set", f"eval.ft_inner_lr={ft['lr']}"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert (results["ft_inner_steps"], results["ft_inner_lr"]) == (ft["steps"], ft["lr"])


def test_adapt_runs_each_method_with_the_inner_loop_meta_test_uses(tmp_path):
    from metatransfer import FewShotClassifier

    out = tmp_path / "run"
    main(run_args(out, "eval.shots=[1]", "meta.inner_steps=4", "eval.inner_steps=6",
                  "eval.inner_lr=0.3", "eval.ft_inner_steps=2", "eval.ft_inner_lr=0.7"))
    mtl = FewShotClassifier.from_checkpoint(out, "mtl", "cpu")
    ft = FewShotClassifier.from_checkpoint(out, "ft", "cpu")
    assert (mtl.learner.steps, mtl.learner.lr) == (6, 0.3)  # eval's, not meta-training's 4
    assert (ft.learner.steps, ft.learner.lr) == (2, 0.7)
    assert FewShotClassifier.from_checkpoint(out, "ft", "cpu", inner_steps=9).learner.steps == 9
