"""``mtl import authors-tf``: the MTL authors' TensorFlow release (.npy dicts).

The files are written here in the release's exact format: a dict of float32 arrays with
the key names of ``tensorflow/models/resnet12.py`` pickled into a 0-d object ``.npy``
(protocol 2, NumPy referenced as ``numpy.core.multiarray`` as in Python 2.7 files). The
imported network is compared with an independent float64 NumPy re-implementation of
the TensorFlow forward pass (NHWC, HWIO kernels, SAME padding, ``tf.contrib`` batch norm
with batch statistics, leaky ReLU 0.1, 5x5 VALID average pool), not with the mapping.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer.checkpoints import build_backbone, load_model
from metatransfer.errors import CheckpointError, MTLError
from metatransfer.importers import main_import
from metatransfer.learners import adapt, linear_logits

WIDTHS = (3, 64, 128, 256, 512)


def write_npy(path: Path, obj: dict) -> None:
    """``np.save`` of a dict as Python 2.7 wrote it: 0-d object array, pickle protocol 2."""
    raw = pickle.dumps(np.array(obj, dtype=object), protocol=2)
    raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(raw)


def release(folder: Path, ways: int = 5, seed: int = 0, meta: bool = True) -> dict:
    """Random weights in the release's key layout; returns the three dicts."""
    rng = np.random.default_rng(seed)
    weights, ss = {}, {}
    for i in range(1, 5):
        cin, cout = WIDTHS[i - 1], WIDTHS[i]
        for j in (1, 2, 3):
            c = cin if j == 1 else cout
            weights[f"block{i}_conv{j}"] = (rng.standard_normal((3, 3, c, cout))
                                            * np.sqrt(2.0 / (9 * c))).astype(np.float32)
            weights[f"block{i}_bias{j}"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
            ss[f"block{i}_conv{j}"] = (0.5 + rng.random((1, 1, c, cout))).astype(np.float32)
            ss[f"block{i}_bias{j}"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        weights[f"block{i}_conv_res"] = (rng.standard_normal((1, 1, cin, cout))
                                         * np.sqrt(1.0 / cin)).astype(np.float32)
    weights["w5"] = (0.05 * rng.standard_normal((512, 64))).astype(np.float32)
    weights["b5"] = np.zeros(64, np.float32)
    fc = {"w5": (0.05 * rng.standard_normal((512, ways))).astype(np.float32),
          "b5": (0.01 * rng.standard_normal(ways)).astype(np.float32)}
    folder.mkdir(parents=True, exist_ok=True)
    write_npy(folder / "weights.npy", weights)
    if meta:
        write_npy(folder / "ss_weights.npy", ss)
        write_npy(folder / "fc_weights.npy", fc)
    return {"weights": weights, "ss_weights": ss, "fc_weights": fc}


# --- the TensorFlow forward pass, re-implemented in float64 NumPy (NHWC) -----------------


def tf_conv_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``tf.nn.conv2d(x, kernel, [1,1,1,1], 'SAME')``: NHWC input, HWIO kernel."""
    k = kernel.shape[0]
    pad = (k - 1) // 2, k - 1 - (k - 1) // 2
    xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[3]))
    for di in range(k):
        for dj in range(k):
            out += np.einsum("nhwc,co->nhwo", xp[:, di:di + h, dj:dj + w, :], kernel[di, dj])
    return out


def tf_batch_norm(x: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """``tf.contrib.layers.batch_norm`` defaults: is_training=True (batch moments over
    N, H, W), center with beta = 0 (its initial value), no scale."""
    mean = x.mean((0, 1, 2))
    var = x.var((0, 1, 2))
    return (x - mean) / np.sqrt(var + eps)


def leaky(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.1 * x)


def tf_forward(rel: dict, images_nhwc: np.ndarray, meta: bool) -> np.ndarray:
    """``forward_resnet`` (meta) or ``forward_pretrain_resnet`` at test (dropout keep 1)."""
    w, ss = rel["weights"], rel["ss_weights"]
    net = images_nhwc.astype(np.float64)
    for i in range(1, 5):
        inp = net
        for j in (1, 2, 3):
            kernel = w[f"block{i}_conv{j}"].astype(np.float64)
            bias = w[f"block{i}_bias{j}"].astype(np.float64)
            if meta:  # process_ss_weights: tile (1,1,in,out) over the kernel; bias replaced
                kernel = kernel * np.tile(ss[f"block{i}_conv{j}"], (3, 3, 1, 1))
                bias = ss[f"block{i}_bias{j}"].astype(np.float64)
            net = leaky(tf_batch_norm(tf_conv_same(net, kernel) + bias))
        net = net + tf_conv_same(inp, w[f"block{i}_conv_res"].astype(np.float64))
        n, h, wd, c = net.shape  # max_pool 2x2 VALID
        net = net[:, :h // 2 * 2, :wd // 2 * 2].reshape(n, h // 2, 2, wd // 2, 2, c).max((2, 4))
    n, h, wd, c = net.shape  # avg_pool 5x5 VALID, stride 5
    net = net[:, :5, :5].reshape(n, 1, 5, 1, 5, c).mean((2, 4))
    return net.reshape(n, -1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf") / "mini-1shot"
    rel = release(folder)
    out = folder.parent / "mtl_tf.safetensors"
    summary = main_import("authors-tf", [folder], out)
    return rel, out, summary


def test_tf_release_reproduces_tensorflow_forward(imported) -> None:
    rel, out, summary = imported
    info, state, head = load_model(out)
    model = build_backbone(info, state).double().eval()
    images = np.random.default_rng(1).random((3, 84, 84, 3))  # imread / 255: [0, 1]
    ref = tf_forward(rel, images, meta=True)
    with torch.no_grad():
        ours = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    # theta_0: x @ w5 + b5
    np.testing.assert_array_equal(head["weight"].numpy(), rel["fc_weights"]["w5"].T)
    np.testing.assert_array_equal(head["bias"].numpy(), rel["fc_weights"]["b5"])
    assert "per-call batch statistics" in summary
    assert "weights/block<i>_conv<j> -> layer<i>.0.conv<j>.weight" in summary
    # BN with batch statistics cancels any per-channel bias, so the forward pass above
    # cannot see it: the meta forward's bias is ss_bias (it replaces the pre-trained one)
    for i in range(1, 5):
        for j in (1, 2, 3):
            conv = f"layer{i}.0.conv{j}"
            np.testing.assert_allclose((state[f"{conv}.bias"] + state[f"{conv}.ss_shift"]).numpy(),
                                       rel["ss_weights"][f"block{i}_bias{j}"], atol=1e-7)


def test_tf_metadata_is_the_tensorflow_pipeline(imported) -> None:
    _, out, _ = imported
    info, _, _ = load_model(out)
    assert (info.backbone, info.image_size, info.resize) == ("resnet12-tf", 84, "direct")
    assert info.mean == [0.0, 0.0, 0.0] and info.std == [1.0, 1.0, 1.0]
    assert info.backbone_args == {"bn_stats": "batch", "bn_eps": 1e-3}
    assert (info.phase, info.ways, info.inner_steps) == ("meta", 5, 100)


def test_tf_inner_loop_matches_their_base_learner(imported) -> None:
    """Their inner step: theta -= 1e-3 * grad(sum_i CE_i / shots); ours uses the mean CE
    with the imported lr (1e-3 * ways): the same adapted classifier."""
    rel, out, _ = imported
    info, _, head = load_model(out)
    ways, shots, dim = 5, 2, 512
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((ways * shots, dim))
    labels = np.repeat(np.arange(ways), shots)
    onehot = np.eye(ways)[labels]
    w5 = rel["fc_weights"]["w5"].astype(np.float64)
    b5 = rel["fc_weights"]["b5"].astype(np.float64)
    for _ in range(info.inner_steps):
        logits = feats @ w5 + b5
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = (p - onehot) / shots
        w5, b5 = w5 - 1e-3 * feats.T @ delta, b5 - 1e-3 * delta.sum(0)
    weight, bias = adapt(head["weight"].double(), head["bias"].double(),
                         torch.from_numpy(feats)[None], torch.from_numpy(labels)[None], ways,
                         info.inner_steps, info.inner_lr)
    query = torch.from_numpy(rng.standard_normal((1, 7, dim)))
    np.testing.assert_allclose(linear_logits(weight, bias, query)[0].numpy(),
                               query[0].numpy() @ w5 + b5, rtol=1e-9, atol=1e-9)


def test_tf_pretrained_only_and_files_given_one_by_one(tmp_path) -> None:
    rel = release(tmp_path / "pre", meta=False)
    out = tmp_path / "pre.safetensors"
    main_import("authors-tf", [tmp_path / "pre" / "weights.npy"], out)
    info, state, head = load_model(out)
    assert info.phase == "imported" and not head
    assert not any(k.endswith("ss_scale") for k in state)
    model = build_backbone(info, state).double().eval()
    images = np.random.default_rng(3).random((2, 84, 84, 3))
    with torch.no_grad():
        ours = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours, tf_forward(rel, images, meta=False), rtol=1e-6, atol=1e-7)


def test_tf_batch_statistics_are_per_call(imported) -> None:
    """Batch-statistics BN: an image's embedding depends on the batch it is embedded with
    (a single image and the same image among others differ), in eval mode too."""
    _, out, _ = imported
    info, state, _ = load_model(out)
    model = build_backbone(info, state).eval()
    x = torch.rand(4, 3, 84, 84)
    with torch.no_grad():
        assert not torch.allclose(model(x[:1]), model(x)[:1], atol=1e-4)


def test_tf_refusals(tmp_path) -> None:
    folder = tmp_path / "rel"
    rel = release(folder)
    (folder / "fc_weights.npy").unlink()
    with pytest.raises(CheckpointError, match="missing: fc_weights.npy"):
        main_import("authors-tf", [folder], tmp_path / "x.safetensors")
    weights = dict(rel["weights"])
    del weights["block3_conv_res"]
    write_npy(folder / "weights.npy", weights)
    write_npy(folder / "fc_weights.npy", rel["fc_weights"])
    with pytest.raises(CheckpointError, match="'block3_conv_res' is missing"):
        main_import("authors-tf", [folder], tmp_path / "x.safetensors")
    weights["block3_conv_res"] = np.zeros((1, 1, 128, 128), np.float32)
    write_npy(folder / "weights.npy", weights)
    with pytest.raises(CheckpointError, match=r"shape \(1, 1, 128, 128\)"):
        main_import("authors-tf", [folder], tmp_path / "x.safetensors")
    (folder / "weights.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MTLError, match="weights.npy"):
        main_import("authors-tf", [folder], tmp_path / "x.safetensors")


def test_tf_pickled_code_is_refused(tmp_path) -> None:
    folder = tmp_path / "evil"
    release(folder)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    raw = pickle.dumps(np.array({"x": Boom()}, dtype=object), protocol=2)
    with (folder / "weights.npy").open("wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(raw)
    with pytest.raises(CheckpointError, match="not unpickled for safety"):
        main_import("authors-tf", [folder], tmp_path / "x.safetensors")


@pytest.mark.slow
def test_meta_test_embeds_support_and_query_calls_apart() -> None:
    """With batch-statistics BN, meta-test's evaluator embeds each episode's support set
    in one call and its query set in another (the authors' TensorFlow meta-test), and so
    gives, episode by episode, the one-episode reference's accuracy."""
    from conftest import make_toy_split

    from metatransfer.data.episodes import EpisodeSampler
    from metatransfer.data.transforms import Normalizer
    from metatransfer.embedding import Embedder, uses_batch_stats
    from metatransfer.evaluation import evaluate, per_episode_accuracy
    from metatransfer.methods.ft import FineTune
    from metatransfer.models import create_backbone

    torch.manual_seed(0)
    split = make_toy_split("val")
    model = create_backbone("resnet12-tf", in_channels=1, widths=(8, 8, 8, 8),
                            bn_stats="batch", bn_eps=1e-3).eval()
    assert uses_batch_stats(model) and not any("running" in k for k in model.state_dict())
    embedder = Embedder(model, Normalizer(split.mean, split.std, torch.device("cpu")),
                        torch.device("cpu"))
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=3, name=split.name)
    calls: list[int] = []
    real = embedder.embed

    def counting(split_, indices, **kw):
        calls.append(len(indices))
        return real(split_, indices, **kw)

    embedder.embed = counting  # type: ignore[method-assign]
    fast = evaluate(FineTune(10, 0.5), embedder, split, sampler, 5, episode_batch=2)
    assert sorted(calls) == [5] * 5 + [15] * 5  # per episode: support call, query call
    del embedder.embed
    slow = [per_episode_accuracy(FineTune(10, 0.5), embedder, split, sampler, i)
            for i in range(5)]
    np.testing.assert_array_equal(fast, np.array(slow, dtype=fast.dtype))


def test_cli_import_authors_tf(tmp_path, capsys) -> None:
    from metatransfer.cli import main

    release(tmp_path / "fc100-5shot", ways=5, seed=4)
    out = tmp_path / "fc100.safetensors"
    main(["import", "authors-tf", str(tmp_path / "fc100-5shot"), "--dataset", "fc100",
          "--out", str(out)])
    text = capsys.readouterr().out
    assert "imported authors-tf" in text and "84 px" in text
    info, _, _ = load_model(out)
    # FC100 upsampled: their 5x5 VALID average pool needs a 5x5 last map (80-95 px input)
    assert info.image_size == 84 and info.extra["dataset"] == "fc100"
    assert info.inner_lr == pytest.approx(5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "protonet"])
def test_api_matches_meta_test_with_batch_statistics(tmp_path, method) -> None:
    """FewShotClassifier embeds the support set in one call and the queries in another,
    as meta-test does for a batch-statistics model: the same per-episode accuracy."""
    from conftest import make_method, make_toy_split

    from metatransfer import FewShotClassifier
    from metatransfer.checkpoints import ModelInfo, save_model
    from metatransfer.data.episodes import EpisodeSampler
    from metatransfer.data.transforms import Normalizer
    from metatransfer.embedding import Embedder
    from metatransfer.evaluation import evaluate
    from metatransfer.models import create_backbone

    torch.manual_seed(1)
    args = {"widths": [8, 8, 8, 8], "bn_stats": "batch", "bn_eps": 1e-3}
    model = create_backbone("resnet12-tf", in_channels=1, **args)
    split = make_toy_split("test")
    info = ModelInfo(backbone="resnet12-tf", backbone_args=args, in_channels=1, image_size=16,
                     mean=list(split.mean), std=list(split.std), phase="imported",
                     inner_steps=10, inner_lr=0.5)
    save_model(tmp_path / "m.safetensors", info, model)
    clf = FewShotClassifier.from_checkpoint(tmp_path / "m.safetensors", method, "cpu",
                                            amp="off")  # compared with an fp32 Embedder
    sampler = EpisodeSampler(split.indices_by_class, 4, 2, 3, seed=7, name=split.name)
    embedder = Embedder(model.eval(), Normalizer(split.mean, split.std, torch.device("cpu")),
                        torch.device("cpu"))
    want = evaluate(make_method(method, 10, 0.5), embedder, split, sampler, 4)
    for ep in range(4):
        batch = sampler.episode(ep)
        support = {str(j): list(split.images[batch.support[0, j * 2:(j + 1) * 2]])
                   for j in range(4)}
        predicted = clf.fit(support).predict(split.images[batch.query[0]])
        got = np.mean([int(p) == t for p, t in zip(predicted, batch.query_labels(),
                                                    strict=True)])
        assert got == pytest.approx(want[ep], abs=1e-6)
