"""Smoke tests of the benchmarks: they run at a tiny size and print parseable JSON lines."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:  # the speed benchmarks import their shared timing.py
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


SPEED = ["kernel_rates", "pretrain_speed", "meta_train_speed", "meta_test_speed"]


@pytest.mark.slow
def test_throughput_quick(capsys):
    for name in SPEED:
        load(name).main(["--quick", "--device", "cpu", "--backbones", "conv4@16"])
    records = json_lines(capsys.readouterr().out)
    measures = {r["measure"] for r in records}
    assert {"machine", "kernels", "flops", "pretrain", "data_pipeline", "meta_backbone_fwd_bwd",
            "meta_train", "meta_batch", "meta_batch_ht", "ht_reuse_saving", "embed", "meta_test",
            "total"} <= measures
    train = [r for r in records if r["measure"] == "meta_train"]
    assert {(r["shots"], r["order"], r["precision"]) for r in train} == {
        (s, o, p) for s in (1, 5) for o in ("first", "second") for p in ("fp32", "bf16")}
    for precision in ("fp32", "bf16"):
        pre = next(r for r in records if r["measure"] == "pretrain"
                   and r["precision"] == precision)
        assert pre["images_per_s"] > 0 and 0 <= pre["fraction_of_peak"] < 2
        assert pre["train_gflop_per_image"] > 0 and pre["peak_mib"] > 0
    # every fraction is against (at least) the best kernel of its own precision measured
    # by the same setup, i.e. the kernels record before it
    last: dict[str, dict] = {}
    for r in records:
        if r["measure"] == "kernels":
            assert r["peak_gflops"] == max(r[f"{k}_gflops"] for k in ("mm", "conv1x1",
                                                                      "conv3x3"))
            last[r["precision"]] = r
        elif "fraction_of_peak" in r:
            assert r["peak_gflops"] >= last[r["precision"]]["peak_gflops"]
            assert r["fraction_of_peak"] == pytest.approx(
                r["achieved_gflops"] / r["peak_gflops"], rel=0.02, abs=1e-3)
    table = load("speed_table").table([json.dumps(r) for r in records])
    assert "| conv4@16 | pre-train | batch 8 |" in table and "x |" in table


def test_eval_speedup_tiny(capsys):
    load("eval_speedup").main([
        "--dataset", "toy", "--backbone", "conv4", "--backbone-args", '{"width": 8}',
        "--image-size", "16", "--episodes", "6", "--many", "12", "--queries", "3",
        "--inner-steps", "3", "--embed-sample", "8", "--device", "cpu"])
    records = json_lines(capsys.readouterr().out)
    once = [r for r in records if r["measure"] == "embed_once"]
    assert [r["episodes_per_setting"] for r in once] == [6, 12]
    assert once[0]["speedup"] > 0 and once[0]["distinct_images"] <= once[0]["images"]


def test_gpu_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    subprocess.run([bash, "-n", str(BENCH / "gpu.sh")], check=True)


@pytest.mark.slow
def test_gpu_script_cpu_fallback(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "BACKBONES": "conv4@16",
           "EXTRA": "--quick --skip metabatch", "SKIP_INSTALL": "1",
           "SPEED": "pretrain_speed meta_train_speed",
           "PYTHON": sys.executable}
    subprocess.run([bash, str(BENCH / "gpu.sh")], check=True, env=env, timeout=300,
                   capture_output=True)
    records = json_lines((tmp_path / "gpu_results.jsonl").read_text())
    assert records[0]["measure"] == "machine" and records[0]["device"] == "cpu"
    assert any(r["measure"] == "pretrain" for r in records)


@pytest.mark.slow
def test_accuracy_benchmark_and_report(tmp_path, capsys):
    out = tmp_path / "bench"
    load("accuracy").main(tiny_bench_args(out) + [
        "--variants", "mtl+ht,mtl-last", "--baselines", "protonet,ft,ft-all",
        "--set", "eval.ft_all_episodes=3", "--set", "eval.ft_all_steps=2",
        "--set", "model.ss_scope=blocks.2*,blocks.3*"])
    results = json.loads((out / "results.json").read_text())
    # the built-in mtl+ht keeps the preset's SS scope; mtl-last forces its own
    assert results["variants"]["mtl+ht"] == {"meta.ht": "resample"}
    scopes = {v: yaml.safe_load((out / v / "config.yaml").read_text())["model"]["ss_scope"]
              for v in ("mtl+ht", "mtl-last")}
    assert scopes == {"mtl+ht": "blocks.2*,blocks.3*", "mtl-last": "last"}
    methods = [r["method"] for r in results["results"]]
    # each variant also as its best trained epoch ("-forced": what SS does, whatever
    # selection kept)
    assert methods == ["protonet", "ft", "ft-all", "mtl+ht", "mtl+ht-forced", "mtl-last",
                       "mtl-last-forced"]
    assert results["variants"]["mtl-last"] == {"model.ss_scope": "last", "meta.ht": "off"}
    for name in ("results.md", "learning_curves.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["method"] for r in rows if "method" in r] == methods
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [
        ("mtl+ht", "ft"), ("mtl-last", "ft"), ("mtl+ht-forced", "ft"), ("mtl-last-forced", "ft")]
    assert set(results["selections"]) == {"mtl+ht", "mtl-last"}
    assert all(r["selected_epoch"] >= 0 for r in results["selections"].values())
    # `mtl report` renders the same plots from any run directory
    from metatransfer.cli import main

    (out / "accuracy.png").unlink()
    main(["report", str(out)])
    assert (out / "accuracy.png").is_file()


@pytest.mark.slow
def test_accuracy_benchmark_over_meta_seeds_and_seeds(tmp_path):
    """--meta-seeds: one pre-training, a meta-training per seed; --seeds: the whole
    pipeline per seed. Each seed draws episodes of its own (its eval seed recorded), its
    methods share them; comparisons carry the per-seed paired differences and one interval
    over seeds and episodes, which decides `holds`; baselines on the shared pre-training
    are one network."""
    import numpy as np

    from metatransfer.results import ONE_NETWORK, common_prefix_difference, over_seeds

    bench = load("accuracy")
    out = tmp_path / "meta-seeds"
    results = bench.main(tiny_bench_args(out) + ["--variants", "mtl+ht", "--meta-seeds", "0,1,2"])
    assert results["seeds"] == [0, 1, 2] and results["seed_axis"].startswith("one pre-training")
    assert results["eval_seed"] == {"0": 1234, "1": 2234, "2": 3234}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["seed-0", "seed-1", "seed-2"]
    assert (out / "seed-0" / "pretrain" / "pretrain_best.safetensors").is_file()
    assert not (out / "seed-1" / "pretrain").exists()  # the one pre-training is shared
    # each seed's baseline scores in its own folder, never over seed 0's
    for seed, folder in ((0, "seed-0/pretrain"), (2, "seed-2/baselines")):
        record = json.loads((out / folder / "results.json").read_text())
        assert record["eval_seed"] == 1234 + 1000 * seed
    assert list(results["pretrainings"]) == ["seed 0: pretrain"]
    per_seed_rows = [next(c for c in results["per_seed_comparisons"][str(s)]
                          if (c["a"], c["b"]) == ("mtl+ht", "ft")) for s in (0, 1, 2)]
    assert [c["eval_seed"] for c in per_seed_rows] == [1234, 2234, 3234]
    row = next(c for c in results["comparisons"] if (c["a"], c["b"]) == ("mtl+ht", "ft"))
    assert row["per_seed"] == [c["diff"] for c in per_seed_rows] and row["seeds"] == 3
    assert row["eval_seeds"] == [1234, 2234, 3234]
    episodes = results["per_episode"]
    diffs = [common_prefix_difference(episodes[f"seed{s}:mtl+ht/5w1s"],
                                      episodes[f"seed{s}:ft/5w1s"]) for s in (0, 1, 2)]
    kept_start = all(r["selected_epoch"] == 0 for r in results["selections"]["mtl+ht"].values())
    expected = over_seeds(diffs, one_network=kept_start)  # mtl = ft on the shared network
    for key in ("scope", "mean", "ci95", "ci_method", "holds", "per_seed_ci95"):
        assert row[key] == expected[key], key
    assert row["diff"] == row["mean"] and row["significant"] == expected["significant"]
    assert set(results["selections"]["mtl+ht"]) == {"0", "1", "2"}
    # the baselines do not depend on the meta-training seed: one network, scored on each
    # seed's own episodes (their per-seed accuracies differ by episodes alone)
    ft = next(r for r in results["results"] if r["method"] == "ft")
    assert ft["scope"] == ONE_NETWORK and ft["ci_method"].startswith("episode CI over the 60 ")
    assert not np.array_equal(episodes["seed0:ft/5w1s"], episodes["seed1:ft/5w1s"])
    text = (out / "results.md").read_text()
    assert "mean over 3 seeds" in text and "| seed 0 | seed 1 | seed 2 |" in text
    assert "| ci_method | verdict |" in text and row["ci_method"] in text
    whole = bench.main(tiny_bench_args(tmp_path / "seeds") + [
        "--variants", "mtl+ht", "--baselines", "ft", "--seeds", "0,1"])
    assert list(whole["pretrainings"]) == ["seed 0: pretrain", "seed 1: pretrain"]
    assert whole["eval_seed"] == {"0": 1234, "1": 2235}
    ft = next(r for r in whole["results"] if r["method"] == "ft")
    assert len(ft["per_seed"]) == 2 and ft["scope"] == "across seeds"
    assert not any(c["holds"] for c in whole["comparisons"])  # 2 seeds never hold


def tiny_bench_args(out) -> list[str]:
    from conftest import tiny_overrides

    args = ["--preset", "glyphs-conv4", "--out", str(out), "--set", "eval.shots=[1]"]
    for item in tiny_overrides(out / "unused"):
        if not item.startswith(("out=", "eval.shots")):
            args += ["--set", item]
    return args


@pytest.mark.slow
def test_accuracy_benchmark_pretrains_per_config_and_pairs(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "bench"
    results = load("accuracy").main(tiny_bench_args(out) + [
        "--variants", "mtl", "--variant", "mtl-lr:pretrain.lr=0.02,model.ss_scope=last",
        "--baselines", "ft,protonet", "--baselines-everywhere"])
    # the variant changing a pre-training key got its own pre-training, the other shared
    assert results["pretrainings"] == {"pretrain": ["mtl"], "pretrain@mtl-lr": ["mtl-lr"]}
    assert (out / "pretrain@mtl-lr" / "pretrain_best.safetensors").is_file()
    assert results["variants"]["mtl-lr"] == {"pretrain.lr": "0.02", "model.ss_scope": "last"}
    assert [r["method"] for r in results["results"]] == [
        "ft", "protonet", "mtl", "mtl-forced", "mtl-lr", "mtl-lr-forced", "ft@mtl-lr",
        "protonet@mtl-lr"]
    comparisons = results["comparisons"]
    assert [(c["a"], c["b"]) for c in comparisons] == [
        ("mtl", "ft"), ("mtl-lr", "ft"), ("mtl-forced", "ft"), ("mtl-lr-forced", "ft"),
        ("mtl-lr", "ft@mtl-lr"), ("ft@mtl-lr", "ft")]
    per_episode = results["per_episode"]
    saved = json.loads((out / "episodes.json").read_text())
    for c in comparisons:
        a, b = per_episode[f"{c['a']}/5w1s"], per_episode[f"{c['b']}/5w1s"]
        assert c["episodes"] == len(a) == len(b) == 20
        assert c["diff"] == round(float(np.mean(a.astype(float) - b) * 100), 2)
        a, b = np.array(saved[f"{c['a']}/5w1s"]), np.array(saved[f"{c['b']}/5w1s"])
        assert c["diff"] == pytest.approx(100 * (a - b).mean(), abs=0.01)
    # a different pre-training gives different baseline features
    assert not np.array_equal(per_episode["protonet/5w1s"], per_episode["protonet@mtl-lr/5w1s"])
    assert "mtl-lr − ft@mtl-lr" in (out / "results.md").read_text()
    printed = [r for r in json_lines(capsys.readouterr().out) if "a" in r]
    assert [(r["a"], r["b"]) for r in printed] == [(c["a"], c["b"]) for c in comparisons]


def test_accuracy_benchmark_explicit_pairs():
    bench = load("accuracy")
    methods = ["ft", "ft-all", "mtl", "mtl-last", "mtl+ht-reuse"]
    assert bench.parse_pairs("mtl-last-mtl,ft-all-ft,mtl+ht-reuse-ft-all", methods) == [
        ("mtl-last", "mtl"), ("ft-all", "ft"), ("mtl+ht-reuse", "ft-all")]
    with pytest.raises(SystemExit, match="cannot read"):
        bench.parse_pairs("mtl-protonet", methods)
    assert bench.parse_variant("lr:meta.lr_ss=2e-3,eval.shots=[1,5]") == (
        "lr", {"meta.lr_ss": "2e-3", "eval.shots": "[1,5]"})


def fake_run(folder: Path, accuracies: list[float], eval_seed: int = 1234) -> Path:
    folder.mkdir()
    results = {"dataset": "toy", "split": "test", "eval_seed": eval_seed,
               "preprocessing": {"image_size": 16},
               "results": [{"method": "mtl", "ways": 5, "shots": 1, "queries": 3,
                            "episodes": len(accuracies)}]}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "episodes.json").write_text(json.dumps({"mtl/5w1s": accuracies}))
    return folder


def test_compare_runs_pairs_episodes(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [0.6, 0.8, 1.0, 0.4])
    b = fake_run(tmp_path / "b", [0.8, 0.8, 1.0, 0.8])
    rows = load("compare_runs").main([str(a), str(b), "--names", "fp32,bf16"])
    # differences 20, 0, 0, 40 points: mean 15, sample std 19.15, CI 1.96 * 19.15 / 2
    assert rows[0]["diff"] == 15.0 and rows[0]["ci95"] == pytest.approx(18.77, abs=0.01)
    assert rows[0]["fp32"] == 70.0 and rows[0]["bf16"] == 85.0
    assert rows[0]["identical_episodes"] == 2 and not rows[0]["significant"]
    assert "bf16 − fp32" in capsys.readouterr().err
    other = fake_run(tmp_path / "c", [0.8, 0.8, 1.0, 0.8], eval_seed=7)
    with pytest.raises(SystemExit, match="not scored on the same episodes: eval_seed"):
        load("compare_runs").main([str(a), str(other)])


def test_compare_runs_over_seeds(tmp_path, capsys):
    """Three runs per side, paired by seed: each seed's paired difference, then their mean
    and t-based CI over the seeds (df 2: t = 4.303); seeds on one eval seed never hold."""
    a = [fake_run(tmp_path / f"a{s}", [0.6, 0.6, 0.6, 0.6]) for s in range(3)]
    b = [fake_run(tmp_path / f"b{s}", acc) for s, acc in
         enumerate([[0.8, 0.8, 0.8, 0.8], [0.7, 0.7, 0.7, 0.7], [0.9, 0.9, 0.9, 0.9]])]
    rows = load("compare_runs").main([",".join(map(str, a)), ",".join(map(str, b))])
    # per seed +20, +10, +30 points: mean 20, sd 10, CI 4.303 * 10 / sqrt(3) = 24.84
    assert rows[0]["per_seed"] == [20.0, 10.0, 30.0] and rows[0]["mean"] == 20.0
    assert rows[0]["ci95"] == pytest.approx(24.84, abs=0.01)
    assert rows[0]["holds"] is False  # paired CIs of 0 per seed, yet the seeds disagree
    assert rows[0]["per_seed_ci95"] == [0.0, 0.0, 0.0]
    assert "not shown" in capsys.readouterr().err
    # +20, +22, +24 on episodes of their own hold; the same runs on one eval seed do not
    b = [fake_run(tmp_path / f"c{s}", [0.8 + s / 50] * 4, eval_seed=1234 + 1001 * s)
         for s in range(3)]
    a = [fake_run(tmp_path / f"d{s}", [0.6] * 4, eval_seed=1234 + 1001 * s) for s in range(3)]
    rows = load("compare_runs").main([",".join(map(str, a)), ",".join(map(str, b))])
    assert rows[0]["mean"] == 22.0 and rows[0]["holds"] is True
    shared = [fake_run(tmp_path / f"e{s}", [0.6] * 4) for s in range(3)]
    same_b = [fake_run(tmp_path / f"f{s}", [0.8 + s / 50] * 4) for s in range(3)]
    rows = load("compare_runs").main([",".join(map(str, shared)), ",".join(map(str, same_b))])
    assert rows[0]["holds"] is False and "share an eval seed" in rows[0]["ci_method"]
    with pytest.raises(SystemExit):
        load("compare_runs").main([",".join(map(str, a)), str(b[0])])


def test_flop_count_of_a_depthwise_backward_is_twice_its_forward():
    """torch's formula counts a grouped convolution's backward as dense (66x here); the
    benchmarks' own counts input and weight gradients at one forward each."""
    timing = load("timing")
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    for groups in (1, 32):
        conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=groups)
        forward = timing.count_flops(lambda conv=conv: conv(x))
        assert forward == 2 * 4 * 32 * (32 // groups) * 9 * 16 * 16
        both = timing.count_flops(lambda conv=conv: conv(x).sum().backward())
        assert both == 3 * forward


def test_combine_seeds_summarises_seed_folders_as_accuracy_py_does(tmp_path, capsys):
    """Seed folders from separate runs give accuracy.py's numbers: the same over_seeds
    interval, one network where mtl = ft in every seed, and a refusal of shared episodes."""
    from metatransfer.results import over_seeds

    combine = load("combine_seeds")
    rng = np.random.default_rng(0)
    folders, diffs = [], []
    for seed, eval_seed in ((0, 1234), (1, 2235), (2, 3236)):
        ft = rng.integers(0, 6, 50) / 5
        mtl = np.clip(ft + rng.choice([0, 0, 0.2], 50), 0, 1)
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        (folder / "seed_results.json").write_text(json.dumps(
            {"seed": seed, "eval_seed": eval_seed, "selections": {}}))
        (folder / "episodes.json").write_text(json.dumps(
            {"ft/5w1s": ft.tolist(), "mtl+ht/5w1s": mtl.tolist(),
             "mtl+ht-kept/5w1s": ft.tolist()}))
        folders.append(folder)
        diffs.append(mtl - ft)
    out = tmp_path / "combined.md"
    assert combine.main([*map(str, folders), "--pairs", "mtl+ht-ft,mtl+ht-kept-ft",
                         "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    got = result["comparisons"]["mtl+ht − ft 5w1s"]
    assert got == over_seeds(diffs) and got["holds"] and got["mean"] > 0
    assert result["comparisons"]["mtl+ht-kept − ft 5w1s"]["scope"] != "across seeds"
    assert "holds" in out.read_text() and "one network" in out.read_text()
    (folders[2] / "seed_results.json").write_text(json.dumps({"seed": 2, "eval_seed": 1234}))
    with pytest.raises(SystemExit, match="share episodes"):
        combine.main([*map(str, folders), "--pairs", "mtl+ht-ft"])


def test_combine_seeds_pairs_another_pipeline_on_the_same_episodes(tmp_path, capsys):
    """--with joins a second network's seed folders as method@NAME and pairs them episode
    by episode; folders drawn with other eval seeds (other episodes) are refused."""
    from metatransfer.results import over_seeds

    combine = load("combine_seeds")
    rng = np.random.default_rng(1)
    main, other, diffs = [], [], []
    for seed, eval_seed in ((0, 1234), (1, 2235), (2, 3236)):
        deep = rng.integers(0, 6, 40) / 5
        conv = np.clip(deep - rng.choice([0, 0, 0.2], 40), 0, 1)
        for name, acc, folders in (("deep", deep, main), ("conv", conv, other)):
            folder = tmp_path / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "seed_results.json").write_text(json.dumps(
                {"seed": seed, "eval_seed": eval_seed, "selections": {},
                 "episode_shape": ["omniglot", "val", 600, 5]}))
            (folder / "episodes.json").write_text(json.dumps({"ft/5w1s": acc.tolist()}))
            folders.append(folder)
        diffs.append(deep - conv)
    joined = ["--with", "conv4=" + ",".join(map(str, other))]
    assert combine.main([*map(str, main), *joined, "--pairs", "ft-ft@conv4"]) == 0
    result = json.loads(capsys.readouterr().out)
    got = result["comparisons"]["ft − ft@conv4 5w1s"]
    assert got == over_seeds(diffs) and got["mean"] > 0
    assert "ft@conv4/5w1s" in result["accuracy"]
    record = json.loads((other[1] / "seed_results.json").read_text())
    (other[1] / "seed_results.json").write_text(json.dumps({**record, "eval_seed": 9}))
    with pytest.raises(SystemExit, match="not the same episodes"):
        combine.main([*map(str, main), *joined, "--pairs", "ft-ft@conv4"])
    (other[1] / "seed_results.json").write_text(json.dumps(
        {**record, "episode_shape": ["omniglot", "val", 100, 5]}))
    with pytest.raises(SystemExit, match="not the same episodes"):
        combine.main([*map(str, main), *joined, "--pairs", "ft-ft@conv4"])
    with pytest.raises(SystemExit, match="one per main folder"):
        combine.main([*map(str, main), "--with", f"conv4={other[0]}", "--pairs", "ft-ft@conv4"])
