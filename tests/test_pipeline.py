"""End to end: pretrain -> meta-train (HT) -> meta-test on the toy dataset, via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_overrides

from metatransfer.cli import main
from metatransfer.data import glyphs

pytestmark = pytest.mark.slow  # end-to-end runs of the phases


def tiny_command(command: str, out) -> list[str]:
    """``mtl COMMAND`` arguments for a seconds-long run on the toy dataset."""
    args = [command, "--quiet"]
    for item in tiny_overrides(out):
        args += ["--set", item]
    return args


def run_cli(args):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"mtl {' '.join(args)} exited {exc.code}"


def test_tiny_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_command("run", out)
    run_cli(args)
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "toy"
    got = {(r["method"], r["shots"]) for r in results["results"]}
    assert got == {(m, s) for m in ("mtl", "ft", "protonet") for s in (1, 5)}
    for row in results["results"]:
        assert row["episodes"] == 20 and row["queries"] == 5 and row["ways"] == 5
        assert 20.0 <= row["accuracy"] <= 100.0 and row["ci95"] >= 0
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "results.md",
                 "pretrain_best.safetensors", "meta_best.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir()), "TensorBoard events written"
    phases = {json.loads(line)["phase"] for line in (out / "metrics.jsonl").open()}
    assert phases == {"pretrain", "meta"}
    table = capsys.readouterr().out
    assert "5-way 1-shot" in table and "mtl" in table
    # paired comparisons, recomputable from the per-episode file
    episodes = json.loads((out / "episodes.json").read_text())
    assert sorted(episodes) == sorted(f"{m}/5w{s}s" for m in ("mtl", "ft", "protonet")
                                      for s in (1, 5))
    comparisons = results["comparisons"]
    assert [(c["a"], c["b"], c["shots"]) for c in comparisons] == [
        (a, b, s) for a, b in (("mtl", "ft"), ("mtl", "protonet"), ("ft", "protonet"))
        for s in (1, 5)]
    for c in comparisons:
        a, b = (np.array(episodes[f"{m}/5w{c['shots']}s"]) for m in (c["a"], c["b"]))
        assert c["episodes"] == 20
        assert c["diff"] == pytest.approx(100 * (a - b).mean(), abs=0.01)
        assert c["significant"] == (abs(c["diff"]) > c["ci95"])
    assert "mtl − ft" in (out / "results.md").read_text()
    # wall-clock figures apart from the reproducible results, the run's total included
    timing = json.loads((out / "timing.json").read_text())
    assert sorted(timing) == ["eval_seconds", "run_seconds"]
    assert 0 < timing["eval_seconds"] <= timing["run_seconds"]
    assert not {"eval_seconds", "run_seconds"} & set(results)
    assert f"({timing['run_seconds']:.0f} s)" in table


def test_rerun_into_existing_run_dir_asks_for_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_command("pretrain", out)
    run_cli(args)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err


def test_meta_test_methods_share_episodes_and_ft_all_runs(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_command("run", out)
    run_cli(args)
    args = ["meta-test", "--quiet", "--checkpoint", str(out), "--method", "mtl,ft-all,protonet",
            "--episodes", "6", "--set", "eval.ft_all_steps=3", "--set", "eval.shots=[1]"]
    before = {name: (out / name).read_bytes()
              for name in ("results.json", "results.md", "config.yaml", "environment.json")}
    run_cli(args)
    for name, data in before.items():  # the evaluated run's files are never rewritten
        assert (out / name).read_bytes() == data, name
    (evaluation,) = out.glob("eval-*")
    results = json.loads((evaluation / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["mtl", "ft-all", "protonet"]
    assert all(r["episodes"] == 6 for r in results["results"])
    assert (evaluation / "config.yaml").is_file() and not (evaluation / "state").exists()
    assert sorted(json.loads((evaluation / "timing.json").read_text())) == ["eval_seconds"]
    assert str(evaluation / "results.md") in capsys.readouterr().out

    def fails(extra, message):
        with pytest.raises(SystemExit) as exc:
            main(["meta-test", "--quiet", "--checkpoint", str(out), "--episodes", "6", *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    # an explicit --out that holds results (the run itself, or an earlier evaluation)
    fails(["--out", str(out)], "choose another --out")
    fails(["--out", str(evaluation)], "choose another --out")
    # failures before and during the evaluation leave no new folder behind
    fails(["--method", "mtl,nope"], "unknown method 'nope'")
    fails(["--set", "eval.shots=[500]"], "500-shot")
    assert list(out.glob("eval-*")) == [evaluation]
    assert "data_fingerprint" not in results  # only datasets that have one record it

    # glyphs results record the fingerprint of the fonts the images were rendered from
    glyph_eval = tmp_path / "glyph-eval"
    run_cli(["meta-test", "--quiet", "--checkpoint", str(out), "--out", str(glyph_eval),
             "--episodes", "4", "--method", "protonet", "--set", "data.name=glyphs",
             "--set", "data.image_size=16", "--set", "data.glyph_classes=30",
             "--set", "data.glyph_images=12", "--set", "eval.shots=[1]"])
    results = json.loads((glyph_eval / "results.json").read_text())
    assert results["data_fingerprint"] == glyphs.glyph_font_fingerprint()


def test_meta_test_validates_before_creating_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["meta-test", "--quiet"])
    assert exc.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    for bad in (tmp_path / "missing", tmp_path / "missing.safetensors"):
        with pytest.raises(SystemExit) as exc:
            main(["meta-test", "--quiet", "--checkpoint", str(bad)])
        assert exc.value.code == 2 and "not found" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["meta-test", "--quiet", "--checkpoint", str(tmp_path / "junk.safetensors")])
    assert exc.value.code == 2 and "truncated or corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors"]
