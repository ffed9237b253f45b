"""Results: accuracies with their CIs, paired comparisons, the files and the printout.

What meta-test (and the accuracy benchmark) report, in one place that needs no torch:

* :func:`mean_ci95`, :func:`paired_difference`, :func:`paired_row`, :func:`comparison_rows`:
  mean accuracy ± 95% CI over episodes, and the paired difference of two methods scored
  on the same episodes (its CI is several times narrower than either method's own);
* :func:`over_seeds`, :func:`experiment_interval`: one interval for an experiment over
  training seeds, each scored on episodes of its own, covering training and episodes at
  once; ``holds`` is decided on it (SPEC section 7);
* :func:`result_row`, :func:`training_sizes`: the rows and fields of ``results.json``;
* :func:`write_results`: ``results.json`` (only what the seed and config decide:
  byte-identical for a seed on CPU), ``timing.json`` (wall-clock figures, :data:`TIMING_KEYS`),
  ``episodes.json`` (per-episode accuracies) and ``results.md``; :func:`write_timing`
  rewrites the timing alone once a caller knows more (``mtl run``'s total time);
* :func:`results_table`, :func:`comparisons_table`, :func:`printout`: markdown tables and
  what the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
TIMING_JSON = "timing.json"
EPISODES_JSON = "episodes.json"
#: wall-clock figures: kept out of results.json, which must be reproducible
TIMING_KEYS = ("eval_seconds", "run_seconds")
COMPARISONS_LEGEND = ("Paired difference a − b of per-episode accuracy, in points, ± 95% CI; "
                      "`*`: the CI excludes 0.")


# ----------------------------------------------------------------------------- statistics


def mean_ci95(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and 95% CI half-width, in percent: ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation (ddof=1), 0 for a single episode.
    """
    acc = np.asarray(accuracies, dtype=np.float64) * 100.0
    if len(acc) < 2:
        return float(acc.mean()) if len(acc) else float("nan"), 0.0
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc)))


def paired_difference(acc_a: np.ndarray, acc_b: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width of ``acc_a - acc_b`` per episode, in percentage points.

    Two methods scored on the same episodes share each episode's difficulty, so the CI of
    the per-episode difference is several times narrower than either method's own CI: it
    is the one that says whether A beats B. Same convention as :func:`mean_ci95`.
    """
    a, b = np.asarray(acc_a, dtype=np.float64), np.asarray(acc_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired accuracies need the same episodes; got {len(a)} and {len(b)}")
    return mean_ci95(a - b)


def setting_key(method: str, ways: int, shots: int) -> str:
    """The key of one method's per-episode accuracies in one setting, e.g. ``mtl/5w1s``."""
    return f"{method}/{ways}w{shots}s"


def common_prefix_difference(acc_a: np.ndarray, acc_b: np.ndarray) -> np.ndarray:
    """``acc_a - acc_b`` per episode on their common prefix: a method scored on fewer
    episodes (``ft-all``) is compared on the episodes both have."""
    n = min(len(acc_a), len(acc_b))
    return np.asarray(acc_a[:n], dtype=np.float64) - np.asarray(acc_b[:n], dtype=np.float64)


def paired_row(acc_a: np.ndarray, acc_b: np.ndarray) -> dict:
    """``acc_a - acc_b`` on their common prefix of episodes, as a comparison row's fields:
    ``episodes`` (the prefix length), ``diff`` and ``ci95`` (:func:`paired_difference`,
    rounded to 2 decimals) and ``significant`` (at least 2 episodes and ``|diff| > ci95``).
    """
    n = min(len(acc_a), len(acc_b))
    diff, ci = mean_ci95(common_prefix_difference(acc_a, acc_b))
    return {"episodes": n, "diff": round(diff, 2), "ci95": round(ci, 2),
            "significant": bool(n >= 2 and abs(diff) > ci)}


def comparison_rows(per_episode: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                    settings: list[tuple[int, int]]) -> list[dict]:
    """Paired differences ``a - b`` for every pair and (ways, shots) both methods have.

    ``per_episode`` maps :func:`setting_key` to accuracies of episodes ``0 .. n-1``; a method
    scored on fewer episodes (``ft-all``) is compared on the common prefix, whose length is
    recorded. Rounded like accuracies (2 decimals) so results stay byte-identical.
    """
    rows = []
    for a, b in pairs:
        for ways, shots in settings:
            acc_a = per_episode.get(setting_key(a, ways, shots))
            acc_b = per_episode.get(setting_key(b, ways, shots))
            if acc_a is None or acc_b is None:
                continue
            rows.append({"a": a, "b": b, "ways": ways, "shots": shots,
                         **paired_row(acc_a, acc_b)})
    return rows


# ----------------------------------------------------------------------------- records


# two-sided 95% quantiles of Student's t, by degrees of freedom (df > 30: a Cornish-Fisher
# expansion around the normal quantile, within 1e-3 of the exact value)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (95% two-sided)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


#: seeds a claim "A beats B" needs (SPEC section 7)
MIN_SEEDS = 3
#: the scope of a summary over seeds: each seed trained its own networks, or neither
#: network compared changes with the seed (one pre-training shared by all seeds)
ACROSS_SEEDS, ONE_NETWORK = "across seeds", "one network"
#: seeds whose means agree more closely than this chance allows under their own episode
#: noise were not scored on independent episodes (see :func:`experiment_interval`)
AGREEMENT_P = 0.01


def chi2_cdf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom <= ``x``): the regularised lower
    incomplete gamma function P(df/2, x/2) by its power series (fast where it is used,
    in the lower tail)."""
    if x <= 0:
        return 0.0
    a, h = df / 2, x / 2
    term = total = 1.0 / a
    n = 0
    while term > total * 1e-15 and n < 10_000:
        n += 1
        term *= h / (a + n)
        total += term
    return min(1.0, math.exp(a * math.log(h) - h - math.lgamma(a)) * total)


def seed_means(per_seed: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's mean over its episodes (points) and that mean's variance over
    episodes (points squared: ``var / n``, ddof 1), from per-episode values as fractions."""
    arrays = [np.asarray(v, dtype=np.float64) * 100.0 for v in per_seed]
    means = np.array([a.mean() for a in arrays])
    var = np.array([a.var(ddof=1) / len(a) if len(a) > 1 else 0.0 for a in arrays])
    return means, var


def too_close(means: np.ndarray, var: np.ndarray) -> bool:
    """Whether the seeds' means agree more closely than their own episode noise allows:
    with independent episode streams ``(S - 1) s^2 / mean(var)`` is chi-square (larger
    with training noise) with S - 1 degrees of freedom, so a value in its lowest
    :data:`AGREEMENT_P` says the seeds shared episodes (a fixed ``eval.seed``) or were
    rounded alike."""
    noise = float(var.mean())
    if len(means) < 2 or noise == 0.0:
        return False
    stat = (len(means) - 1) * float(means.var(ddof=1)) / noise
    return chi2_cdf(stat, len(means) - 1) < AGREEMENT_P


def experiment_interval(per_seed: list[np.ndarray]) -> tuple[float, float, str]:
    """Mean over seeds (points), 95% CI half-width and its method, covering training
    seeds and episodes at once: Student's t over the per-seed means, df = seeds - 1.

    Why this covers both: each seed is scored on episodes of its own (the eval seed is
    derived from the training seeds), so the per-seed means are independent draws of
    ``effect + training noise + episode noise``; their spread estimates the sum of both
    variances, and the t interval is exact for normal means (600 episodes make them so)
    whatever the share of either. A hierarchical bootstrap (seeds, then episodes) is the
    other textbook choice, but with 3 seeds it resamples 3 values and undercovers
    (75-80% where training variance dominates; tests/test_intervals.py simulates it),
    while this interval's simulated coverage is 95-96% at every share.

    One guard: where the seeds agree more closely than independent episodes allow
    (:func:`too_close`), they did not draw independent episodes, and the interval is
    one seed's episode CI (root mean square over the seeds): averaging seeds does not
    shrink the noise of shared episodes. With independent streams this fires in at most
    1% of experiments and lifts the coverage by under 1 point.

    Classes: each episode draws its classes from the evaluated split, so the interval
    covers which of the split's classes an episode meets, and no more: which classes the
    split holds (Omniglot's 5 reported alphabets, 8 miniImageNet classes) is fixed, and
    another draw of them would add variance this interval does not estimate.
    """
    means, var = seed_means(per_seed)
    n = len(means)
    mean = float(means.mean())
    if too_close(means, var):
        return mean, Z975 * math.sqrt(float(var.mean())), (
            "one seed's episode CI: the seeds agree more closely than independent "
            f"episodes allow (chi-square, p < {AGREEMENT_P})")
    half = t_quantile_975(n - 1) * float(means.std(ddof=1)) / math.sqrt(n)
    return mean, half, (f"t over {n} per-seed means (df {n - 1}), each seed on its own "
                        "episodes")


def one_network_interval(per_seed: list[np.ndarray]) -> tuple[float, float, str]:
    """Mean and 95% CI (points) of a network that does not change with the seed: the
    episode CI over all the episodes it was scored on, each distinct stream once (seeds
    that drew the very same episodes add nothing)."""
    distinct = list({np.asarray(v, dtype=np.float64).tobytes(): np.asarray(v, np.float64)
                     for v in per_seed}.values())
    pooled = np.concatenate(distinct)
    mean, half = mean_ci95(pooled)
    return mean, half, f"episode CI over the {len(pooled)} episodes of one network"


def over_seeds(per_seed: list[np.ndarray], one_network: bool = False) -> dict:
    """Per-episode values (accuracies or paired differences, as fractions) of each seed,
    summarised for the whole experiment, in points rounded to 2 decimals: ``scope``,
    ``seeds``, ``per_seed`` (each seed's mean), ``per_seed_ci95`` (its episode CI),
    ``mean``, ``ci95`` and ``ci_method``, ``significant`` (the CI excludes 0) and
    ``holds``: across seeds, at least :data:`MIN_SEEDS` of them and a CI that excludes 0.

    ``one_network`` (or per-seed values that are all the same: one network on the same
    episodes, or ``mtl`` = ``ft`` because selection kept the start) gives the scope
    :data:`ONE_NETWORK` and :func:`one_network_interval`: the seeds then repeat one
    network's evaluation, no training, and such a comparison never holds "across seeds".
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in per_seed]
    same = len(arrays) > 1 and all(np.array_equal(arrays[0], a) for a in arrays[1:])
    scope = ONE_NETWORK if one_network or same else ACROSS_SEEDS
    episode = [mean_ci95(a) for a in arrays]
    out = {"scope": scope, "seeds": len(arrays),
           "per_seed": [round(m, 2) for m, _ in episode],
           "per_seed_ci95": [round(c, 2) for _, c in episode]}
    if scope == ONE_NETWORK:
        mean, half, method = one_network_interval(arrays)
    elif len(arrays) < 2:
        mean, half, method = episode[0][0], math.nan, "one seed: nothing over seeds"
    else:
        mean, half, method = experiment_interval(arrays)
    significant = bool(math.isfinite(half) and abs(mean) > half)
    return {**out, "mean": round(mean, 2),
            "ci95": round(half, 2) if math.isfinite(half) else None, "ci_method": method,
            "significant": significant,
            "holds": significant and scope == ACROSS_SEEDS and len(arrays) >= MIN_SEEDS}


def result_row(method: str, ways: int, shots: int, queries: int, acc) -> dict:
    """One method in one setting: accuracy and CI in percent, rounded to 2 decimals."""
    mean, ci = mean_ci95(acc)
    log.info("%s %d-way %d-shot: %.2f%% ± %.2f", method, ways, shots, mean, ci)
    return {"method": method, "ways": ways, "shots": shots, "queries": queries,
            "episodes": int(len(acc)), "accuracy": round(mean, 2), "ci95": round(ci, 2)}


def training_sizes(cfg) -> dict:
    """The global batch sizes and learning rates of the run's training phases (they do not
    depend on the number of processes: each process takes a share of every batch)."""
    pc, mc = cfg.pretrain, cfg.meta
    return {"pretrain_batch_size": pc.batch_size, "pretrain_lr": pc.lr,
            "meta_batch": mc.meta_batch, "ht_tasks": mc.hard_tasks_per_batch,
            "meta_lr_ss": mc.lr_ss, "meta_lr_head": mc.lr_head}


# ----------------------------------------------------------------------------- tables


def results_table(results: dict) -> str:
    """Markdown table: one row per (ways, shots), one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in results["results"]))
    settings = list(dict.fromkeys((r["ways"], r["shots"]) for r in results["results"]))
    cell = {(r["method"], r["ways"], r["shots"]): r for r in results["results"]}
    lines = ["| setting | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for ways, shots in settings:
        values = []
        for m in methods:
            r = cell.get((m, ways, shots))
            values.append(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" if r else "–")
        lines.append(f"| {ways}-way {shots}-shot | " + " | ".join(values) + " |")
    return "\n".join(lines)


def comparisons_table(comparisons: list[dict]) -> str:
    """Markdown table of paired differences: one row per pair, one column per setting."""
    if not comparisons:
        return ""
    pairs = list(dict.fromkeys((c["a"], c["b"]) for c in comparisons))
    settings = list(dict.fromkeys((c["ways"], c["shots"]) for c in comparisons))
    most = max(c["episodes"] for c in comparisons)
    cell = {(c["a"], c["b"], c["ways"], c["shots"]): c for c in comparisons}
    lines = ["| difference | " + " | ".join(f"{w}-way {s}-shot" for w, s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for a, b in pairs:
        values = []
        for ways, shots in settings:
            c = cell.get((a, b, ways, shots))
            if c is None:
                values.append("–")
                continue
            fewer = f" ({c['episodes']} ep.)" if c["episodes"] < most else ""
            star = " *" if c["significant"] else ""
            values.append(f"{c['diff']:+.2f} ± {c['ci95']:.2f}{star}{fewer}")
        lines.append(f"| {a} − {b} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n\n" + COMPARISONS_LEGEND


SEEDS_LEGEND = ("Mean over seeds of the paired difference a − b (points) ± 95% CI covering "
                "training seeds and episodes (each seed on episodes of its own; method in "
                "`ci_method`). *holds*: at least {min_seeds} seeds and a CI that excludes 0; "
                "*one network*: neither side changes with the seed, so the seeds repeat one "
                "network's evaluation and the CI is its episode CI.")


def verdict(row: dict) -> str:
    """What a summary over seeds (:func:`over_seeds`) shows, in the words the project
    uses: "holds" or "not shown", and "one network" said outright where it applies."""
    if row.get("scope") == ONE_NETWORK:
        return "one network: " + ("CI excludes 0" if row["significant"] else "not shown")
    return "holds" if row["holds"] else "not shown"


def seeds_comparisons_table(comparisons: list[dict]) -> str:
    """Markdown table of comparisons over seeds: per-seed differences, the experiment's
    mean ± ``ci95``, its ``ci_method`` and the verdict (:func:`verdict`)."""
    if not comparisons:
        return ""
    lines = ["| difference | setting | per seed | mean ± 95% CI | ci_method | verdict |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        ci = "–" if c["ci95"] is None else f"{c['ci95']:.2f}"
        lines.append(f"| {c['a']} − {c['b']} | {c['ways']}-way {c['shots']}-shot | "
                     + ", ".join(f"{d:+.2f}" for d in c["per_seed"])
                     + f" | {c['mean']:+.2f} ± {ci} | {c['ci_method']} | {verdict(c)} |")
    return "\n".join(lines) + "\n\n" + SEEDS_LEGEND.format(min_seeds=MIN_SEEDS)


SELECTION_KEYS = ("selected_epoch", "selection_acc", "meta_epochs", "selection")


def selection_record(extra: dict) -> dict | None:
    """What selection kept, from a meta checkpoint's metadata (``results.json``'s
    ``"selection"``): the meta-training epoch (0 = the pre-trained network), its selection
    accuracy, the number of epochs and where selection looked; None for checkpoints that
    do not record it (older ones, imports)."""
    if "selected_epoch" not in extra:
        return None
    return {k: extra[k] for k in SELECTION_KEYS if k in extra}


def selection_sentence(selection: dict | None) -> str:
    """The kept epoch in words; "mtl = ft" said outright when it is the starting network."""
    if not selection:
        return ""
    epoch, acc = selection["selected_epoch"], selection.get("selection_acc")
    where = f" on {selection['selection']}" if selection.get("selection") else ""
    if epoch == 0:
        return (f"Selection kept the pre-trained network (meta-training epoch 0, selection "
                f"accuracy {acc:.2f}%{where}): mtl = ft, SS is the identity.")
    total = f" of {selection['meta_epochs']}" if selection.get("meta_epochs") else ""
    return (f"Selection kept meta-training epoch {epoch}{total} (selection accuracy "
            f"{acc:.2f}%{where}).")


def pretrain_sentence(record: dict | None) -> str:
    """Which fine-tuning epoch of a pre-training from ``pretrain.init`` was kept, in words
    (epoch 0: ft, protonet and mtl all start from the import as it came)."""
    if not record:
        return ""
    epoch, acc = record["pretrain_selected_epoch"], record.get("pretrain_selection_acc")
    if epoch == 0:
        return (f"Pre-training kept the imported network as it came (epoch 0, selection "
                f"accuracy {acc:.2f}%): fine-tuning on the base classes did not beat it.")
    return (f"Pre-training kept fine-tuning epoch {epoch} of {record['pretrain_epochs']} "
            f"(selection accuracy {acc:.2f}%).")


def printout(results: dict, folder: Path, suffix: str = "") -> str:
    """What ``mtl run`` / ``mtl meta-test`` print: the accuracy table, the paired
    differences, what selection kept and where the results are."""
    text = results_table(results)
    if results["comparisons"]:
        text += ("\n\npaired differences (points, 95% CI; * = CI excludes 0):\n"
                 + comparisons_table(results["comparisons"]))
    if results.get("pretrain_selection"):
        text += "\n\n" + pretrain_sentence(results["pretrain_selection"])
    if results.get("selection"):
        text += "\n\n" + selection_sentence(results["selection"])
    return text + f"\n\nresults in {Path(folder) / RESULTS_MD}{suffix}"


# ----------------------------------------------------------------------------- files


def write_episodes(folder: Path, per_episode: dict) -> None:
    """``episodes.json``: per-episode accuracies, one line per method and setting (4
    decimals: exact enough to pair this run with another scored on the same episodes)."""
    lines = [f"{json.dumps(key)}: {json.dumps([round(float(x), 4) for x in acc])}"
             for key, acc in per_episode.items()]
    (Path(folder) / EPISODES_JSON).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def write_timing(folder: Path, results: dict) -> None:
    """``timing.json``: the :data:`TIMING_KEYS` that ``results`` holds."""
    timing = {k: results[k] for k in TIMING_KEYS if k in results}
    (Path(folder) / TIMING_JSON).write_text(json.dumps(timing, indent=2))


def write_results(folder: Path, results: dict) -> None:
    """results.json holds only what the seed and config decide (byte-identical for a seed
    on CPU, so runs can be diffed); wall-clock figures go to timing.json."""
    folder = Path(folder)
    kept = {k: v for k, v in results.items() if k not in (*TIMING_KEYS, "per_episode")}
    (folder / RESULTS_JSON).write_text(json.dumps(kept, indent=2))
    write_timing(folder, results)
    if "per_episode" in results:
        write_episodes(folder, results["per_episode"])
    episodes = results["results"][0]["episodes"] if results["results"] else 0
    queries = results["results"][0]["queries"] if results["results"] else 0
    text = (f"# Results: {results['dataset']} ({results['split']} split), "
            f"{results['backbone']}\n\n"
            f"Accuracy in % with 95% confidence interval over {episodes} episodes "
            f"({queries} queries per class), the same episodes for every method.\n\n"
            f"{results_table(results)}\n")
    if results.get("comparisons"):
        text += f"\n{comparisons_table(results['comparisons'])}\n"
    if results.get("pretrain_selection"):
        text += f"\n{pretrain_sentence(results['pretrain_selection'])}\n"
    if results.get("selection"):
        text += f"\n{selection_sentence(results['selection'])}\n"
    (folder / RESULTS_MD).write_text(text)
