"""`FewShotClassifier` and `mtl adapt`: meta-test parity, CLI/API agreement, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_method, make_toy_split, run_tiny
from PIL import Image

from metatransfer import FewShotClassifier
from metatransfer.adapt import _from_pil, domain_warning, load_image
from metatransfer.checkpoints import ModelInfo, load_model, save_model
from metatransfer.cli import main
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.images import read_image
from metatransfer.data.transforms import Normalizer
from metatransfer.embedding import Embedder
from metatransfer.errors import DataError, MTLError
from metatransfer.evaluation import evaluate, per_episode_accuracy
from metatransfer.loader import CheckpointPaths, load_models
from metatransfer.preprocessing import Decoding

pytestmark = pytest.mark.slow  # end-to-end runs of the phases

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A seconds-long pretrain -> meta-train -> meta-test run on the toy data."""
    # fp32: tools are compared to 1e-6 here; in bf16 an input differing in the 8th digit
    # (e.g. statistics read back from the checkpoint) can round one ulp apart and flip a
    # near-tie of this random toy network (bf16 is checked in test_precision.py)
    return run_tiny(tmp_path_factory.mktemp("adapt") / "run", "amp=off")


@pytest.fixture(scope="module")
def toy_test():
    return make_toy_split("test")


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
    return path


def support_folder(root: Path, split, per_class: dict[int, list[int]]) -> Path:
    for cls, indices in per_class.items():
        for i in indices:
            write_png(root / split.class_names[cls] / f"{i}.png", split.images[i])
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------- meta-test parity


@pytest.mark.parametrize("method", ["mtl", "ft", "protonet"])
def test_adapt_reproduces_meta_test_episodes(run_dir, toy_test, method):
    """Fit on each episode's support, predict its queries: the same accuracy as meta-test."""
    results = json.loads((run_dir / "results.json").read_text())
    steps, lr = results["inner_steps"], results["inner_lr"]
    if method == "ft":  # the preset tunes ft's loop apart; results.json records it
        steps = results.get("ft_inner_steps", steps)
        lr = results.get("ft_inner_lr", lr)
    clf = FewShotClassifier.from_checkpoint(run_dir, method, "cpu", steps, lr, amp="off")
    model = load_models(CheckpointPaths(run_dir / "meta_best.safetensors",
                                        run_dir / "pretrain_best.safetensors"), [method])[method]
    embedder = Embedder(model.backbone.eval(), Normalizer(toy_test.mean, toy_test.std, CPU), CPU,
                        feature_norm=model.info.feature_norm)  # every method, as meta-test
    learner = make_method(method, steps, lr, model.head)
    split = toy_test
    for row in results["results"]:
        if row["method"] != method:
            continue
        sampler = EpisodeSampler(split.indices_by_class, row["ways"], row["shots"],
                                 row["queries"], seed=results["eval_seed"], name=split.name)
        accs = []
        for ep in range(row["episodes"]):
            batch = sampler.episode(ep)
            names = [split.class_names[c] for c in batch.classes[0]]
            shots, queries = batch.shots, batch.queries
            support = {n: [split.images[i] for i in batch.support[0, j * shots:(j + 1) * shots]]
                       for j, n in enumerate(names)}
            truth = [names[j] for j in batch.query_labels()]
            predicted = clf.fit(support).predict(split.images[batch.query[0]])
            acc = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
            assert len(predicted) == row["ways"] * queries
            accs.append(acc)
            if ep < 4:  # the one-episode reference path of meta-test
                reference = per_episode_accuracy(learner, embedder, split, sampler, ep)
                assert acc == pytest.approx(reference, abs=1e-6), (method, row["shots"], ep)
        # every episode, against meta-test's batched evaluator and its reported mean
        batched = evaluate(learner, embedder, split, sampler, row["episodes"])
        np.testing.assert_allclose(accs, batched, atol=1e-6)
        assert 100 * np.mean(accs) == pytest.approx(row["accuracy"], abs=0.006)


def test_default_method_and_device(run_dir):
    clf = FewShotClassifier.from_checkpoint(run_dir)
    assert clf.method == "mtl" and clf.device.type in ("cpu", "cuda")
    pre = FewShotClassifier.from_checkpoint(run_dir / "pretrain_best.safetensors", device="cpu")
    assert pre.method == "protonet"
    with pytest.raises(MTLError, match="meta-trained"):
        FewShotClassifier.from_checkpoint(run_dir / "pretrain_best.safetensors", "mtl", "cpu")


def test_unequal_shots_protonet_uses_each_class_mean(run_dir, toy_test):
    clf = FewShotClassifier.from_checkpoint(run_dir, "protonet", "cpu")
    idx = toy_test.indices_by_class
    support = {"a": [toy_test.images[i] for i in idx[0][:1]],
               "b": [toy_test.images[i] for i in idx[1][:4]],
               "c": [toy_test.images[i] for i in idx[2][:2]]}
    queries = toy_test.images[np.concatenate([idx[c][10:12] for c in range(3)])]
    clf.fit(support)
    assert clf.shots() == {"a": 1, "b": 4, "c": 2}
    feats = {k: clf.embed(np.stack(v)) for k, v in support.items()}
    centroids = torch.stack([f.mean(0) for f in feats.values()])
    expected = torch.softmax(-torch.cdist(clf.embed(queries), centroids).pow(2), -1)
    np.testing.assert_allclose(clf.predict_proba(queries), expected.numpy(), rtol=1e-5,
                               atol=1e-6)
    # mtl and ft run one task with all 7 support images and other numbers of ways
    for method in ("mtl", "ft"):
        m = FewShotClassifier.from_checkpoint(run_dir, method, "cpu").fit(support)
        probs = m.predict_proba(queries)
        assert probs.shape == (6, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


# ----------------------------------------------------------------------- CLI and API


def test_cli_and_api_agree(run_dir, toy_test, tmp_path, capsys):
    idx = toy_test.indices_by_class
    support = support_folder(tmp_path / "support", toy_test,
                             {c: list(idx[c][:3]) for c in range(4)})
    qdir = tmp_path / "queries"
    query_files = [write_png(qdir / f"q{c}_{i}.png", toy_test.images[i])
                   for c in range(4) for i in idx[c][10:12]]
    extra = write_png(tmp_path / "single.png", toy_test.images[idx[0][15]])
    out_json = tmp_path / "pred.json"
    code, _, err = run_cli(["adapt", "--checkpoint", str(run_dir), "--support", str(support),
                            "--query", str(qdir), str(extra), "--top", "3",
                            "--output", str(out_json), "--device", "cpu"], capsys)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["method"] == "mtl" and doc["classes"] == sorted(doc["classes"])

    clf = FewShotClassifier.from_checkpoint(run_dir, device="cpu")
    clf.fit({toy_test.class_names[c]: [support / toy_test.class_names[c] / f"{i}.png"
                                       for i in idx[c][:3]] for c in range(4)})
    files = sorted(query_files) + [extra]
    probs = clf.predict_proba(files)
    assert [p["query"] for p in doc["predictions"]] == [str(f) for f in files]
    assert [p["prediction"] for p in doc["predictions"]] == clf.predict(files)
    for row, p in zip(probs, doc["predictions"], strict=True):
        assert len(p["top"]) == 3
        assert p["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-7)
    # in-memory arrays (already at the model's size) give the same numbers as the files
    arrays = [np.asarray(Image.open(f))[..., None] for f in files]
    np.testing.assert_array_equal(clf.predict_proba(arrays), probs)

    # printed table and CSV
    code, out, _ = run_cli(["adapt", "--checkpoint", str(run_dir), "--support", str(support),
                            "--query", str(extra), "--top", "2", "--device", "cpu"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("query") and str(extra) in lines[1]
    assert lines[1].split()[1] == doc["predictions"][-1]["prediction"]
    out_csv = tmp_path / "pred.csv"
    code, _, _ = run_cli(["adapt", "--checkpoint", str(run_dir), "--support", str(support),
                          "--query", str(qdir), "--output", str(out_csv), "--method",
                          "protonet", "--device", "cpu"], capsys)
    assert code == 0
    rows = out_csv.read_text().strip().splitlines()
    assert rows[0] == "query,class_1,probability_1" and len(rows) == 1 + len(query_files)


def test_checkpoint_round_trip_is_bit_exact(run_dir, toy_test, tmp_path):
    idx = toy_test.indices_by_class
    support = {toy_test.class_names[c]: [toy_test.images[i] for i in idx[c][:2]]
               for c in range(5)}
    queries = toy_test.images[np.concatenate([idx[c][5:9] for c in range(5)])]
    for name, method in (("meta_best", "mtl"), ("pretrain_best", "protonet"),
                         ("pretrain_best", "ft")):
        info, state, head = load_model(run_dir / f"{name}.safetensors")
        copy = tmp_path / f"{name}-copy.safetensors"
        save_model(copy, info, state, head)
        a = FewShotClassifier.from_checkpoint(run_dir / f"{name}.safetensors", method, "cpu")
        b = FewShotClassifier.from_checkpoint(copy, method, "cpu")
        pa = a.fit(support).predict_proba(queries)
        pb = b.fit(support).predict_proba(queries)
        assert np.array_equal(pa, pb), method


# ----------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("invert", [False, True])
def test_in_memory_images_match_the_file_decoder(tmp_path, invert):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", rgb)
    for channels in (1, 3):
        steps = Decoding(16, channels, invert=invert)
        from_file = read_image(path, 16, channels, invert)
        assert np.array_equal(_from_pil(Image.open(path), steps), from_file)
        assert np.array_equal(load_image(path, steps), from_file)
        assert np.array_equal(load_image(rgb, steps), from_file)
        chw = torch.from_numpy(rgb).permute(2, 0, 1)
        assert np.array_equal(load_image(chw, steps), from_file)
        assert np.array_equal(load_image(chw.float() / 255, steps), from_file)
        plain = read_image(path, 16, channels)
        assert np.array_equal(from_file, 255 - plain if invert else plain)
    # an array already at the input size is not resampled, only given the value steps
    small = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    want = 255 - small if invert else small
    assert np.array_equal(load_image(small, Decoding(16, 1, invert=invert))[:, :, 0], want)
    assert np.array_equal(load_image(small[:, :, None], Decoding(16, 1, invert=invert))[:, :, 0],
                          want)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(_from_pil(palette, Decoding(16, 3, invert=invert)),
                          read_image(tmp_path / "p.png", 16, 3, invert))


def test_wrong_layouts_name_the_shape_given_and_the_accepted_ones():
    hwc = torch.zeros(30, 41, 3)
    with pytest.raises(DataError) as exc:
        load_image(hwc, Decoding(16, 3), "class 'a' image 1")
    msg = str(exc.value)
    assert "(30, 41, 3)" in msg and "permute(2, 0, 1)" in msg and "(c, h, w)" in msg
    assert "(30, 3, 41)" not in msg  # never a shape the user did not pass
    with pytest.raises(DataError, match=r"\(3, 30, 41\).*transpose\(1, 2, 0\)"):
        load_image(np.zeros((3, 30, 41), np.uint8), Decoding(16, 3))
    with pytest.raises(DataError, match=r"\(2, 3, 30, 41\) is not an image.*accepted"):
        load_image(torch.zeros(2, 3, 30, 41), Decoding(16, 3))


def test_warns_when_images_are_unlike_the_training_images(tmp_path):
    rng = np.random.default_rng(0)
    photo = write_png(tmp_path / "photo.png", rng.integers(0, 256, (300, 400, 3), np.uint8))
    gray = write_png(tmp_path / "gray.png", rng.integers(0, 256, (32, 32), np.uint8))
    glyphs = ModelInfo(backbone="conv4", in_channels=1, image_size=32, source="glyphs")
    msg = domain_warning(glyphs, [gray, photo])
    assert "grayscale 32×32 images (glyphs)" in msg
    assert "converted to grayscale" in msg and "shrunk from about 300 px" in msg
    assert domain_warning(glyphs, [gray]) is None
    mini = ModelInfo(backbone="resnet12", in_channels=3, image_size=84, source="miniimagenet")
    assert domain_warning(mini, [photo]) is None


def test_a_truncated_jpeg_is_the_only_message(run_dir, toy_test, tmp_path, capsys, caplog):
    """A colour JPEG cut short in the support folder of a grayscale model: the error names
    the file; no 'converted to grayscale' warning comes first (it used to)."""
    import io
    import logging

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buf, format="JPEG")
    support = support_folder(tmp_path / "support", toy_test, {0: [0], 1: [30]})
    whole = buf.getvalue()
    (support / toy_test.class_names[0] / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    query = write_png(tmp_path / "q.png", toy_test.images[1])
    with caplog.at_level(logging.WARNING, logger="metatransfer"):
        code, _, err = run_cli(["adapt", "--checkpoint", str(run_dir), "--device", "cpu",
                                "--support", str(support), "--query", str(query)], capsys)
    assert code == 2 and "cut.jpg cannot be decoded" in err
    assert "grayscale" not in caplog.text and "grayscale" not in err
    # control: the header alone would have drawn the warning, had it been checked first
    gray = ModelInfo(backbone="conv4", in_channels=1, image_size=16)
    assert "converted to grayscale" in domain_warning(gray, [support / toy_test.class_names[0]
                                                             / "cut.jpg"])


def test_api_errors(run_dir, toy_test):
    clf = FewShotClassifier.from_checkpoint(run_dir, device="cpu")
    img = toy_test.images[0]
    with pytest.raises(MTLError, match="fit"):
        clf.predict([img])
    with pytest.raises(DataError, match="at least 2 classes"):
        clf.fit({"only": [img, img]})
    with pytest.raises(DataError, match="class 'b' has no support images"):
        clf.fit({"a": [img], "b": []})
    with pytest.raises(DataError, match="uint8"):
        clf.fit({"a": [img.astype(np.int32)], "b": [img]})
    with pytest.raises(DataError, match="unsupported type"):
        clf.fit({"a": [img], "b": [3]})


# ----------------------------------------------------------------------- bad input (CLI)


def one_line_error(capsys, args) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs_give_one_line_errors(run_dir, toy_test, tmp_path, capsys):
    idx = toy_test.indices_by_class
    good = support_folder(tmp_path / "good", toy_test, {0: list(idx[0][:2]),
                                                        1: list(idx[1][:2])})
    query = write_png(tmp_path / "q.png", toy_test.images[idx[0][5]])

    def adapt(support, checkpoint=run_dir, q=query):
        return one_line_error(capsys, ["adapt", "--checkpoint", str(checkpoint), "--support",
                                       str(support), "--query", str(q), "--device", "cpu"])

    one = support_folder(tmp_path / "one", toy_test, {0: list(idx[0][:2])})
    assert "needs at least 2" in adapt(one)

    empty = support_folder(tmp_path / "empty", toy_test, {0: list(idx[0][:2])})
    (empty / "nothing").mkdir()
    assert "nothing is empty" in adapt(empty)

    text = support_folder(tmp_path / "text", toy_test, {0: [idx[0][0]], 1: [idx[1][0]]})
    (text / toy_test.class_names[1] / "notes.txt").write_text("hello")
    assert "notes.txt is not an image file" in adapt(text)

    corrupt = support_folder(tmp_path / "corrupt", toy_test, {0: [idx[0][0]], 1: [idx[1][0]]})
    (corrupt / toy_test.class_names[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    msg = adapt(corrupt)
    assert "broken.jpg" in msg and "not a readable image" in msg

    assert "q.txt is not an image file" in adapt(good, q=_touch(tmp_path / "q.txt"))
    assert "does not exist" in adapt(good, q=tmp_path / "missing.png")

    info, state, head = load_model(run_dir / "meta_best.safetensors")
    future = ModelInfo(**{**info.__dict__, "format_version": 99})
    save_model(tmp_path / "future.safetensors", future, state, head)
    assert "checkpoint format 99" in adapt(good, tmp_path / "future.safetensors")

    data = (run_dir / "meta_best.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in adapt(good, tmp_path / "cut.safetensors")


def _touch(path: Path) -> Path:
    path.write_text("not an image")
    return path
