"""A checkpoint's preprocessing travels with it; one behaviour for it across tools.

One synthetic meta checkpoint with everything that differs from the defaults: channel
statistics unlike the dataset's, a resize-then-centre-crop policy, L2 feature
normalisation. ``mtl meta-test`` on a folder dataset, :class:`FewShotClassifier`, ``mtl
adapt`` and ``mtl serve`` must give the same answers on the same episodes for every
method; controls show that the checks would catch the dataset's statistics, a whole-image
resize or un-normalised features.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_method
from PIL import Image
from torchvision import transforms

from metatransfer import FewShotClassifier
from metatransfer.checkpoints import ModelInfo, build_backbone, load_model, save_model
from metatransfer.cli import main
from metatransfer.config import DataConfig
from metatransfer.data import load_split
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.images import read_image
from metatransfer.data.transforms import Normalizer
from metatransfer.embedding import Embedder
from metatransfer.errors import MTLError
from metatransfer.evaluation import evaluate
from metatransfer.loader import find_checkpoints, load_models
from metatransfer.models import create_backbone, enable_ss
from metatransfer.preprocessing import resize_pil

CPU = torch.device("cpu")
MEAN, STD = [0.2, 0.45, 0.7], [0.3, 0.2, 0.25]
SIZE, CROP = 16, "crop:22"
COLOURS = [(200, 40, 40), (40, 170, 60), (40, 70, 200), (160, 160, 40)]
EPISODES, STEPS, LR = 8, 30, 0.5


def picture(cls: int, i: int) -> np.ndarray:
    """A 30x24 image: class colour in the centre, a distracting random frame around it
    (what a centre crop keeps differs from what a whole-image resize keeps)."""
    rng = np.random.default_rng([cls, i])
    image = rng.integers(0, 256, (30, 24, 3)).astype(np.float64)
    centre = np.array(COLOURS[cls]) + rng.normal(0, 45, (14, 12, 3))
    image[8:22, 6:18] = centre
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    data = root / "data"
    for cls in range(len(COLOURS)):
        for i in range(8):
            path = data / "test" / f"c{cls}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(cls, i)).save(path)
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=3, width=8)
    with torch.no_grad():  # non-trivial BN statistics
        backbone.train()
        backbone(torch.randn(64, 3, SIZE, SIZE))
    enable_ss(backbone)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith("ss_scale"):
                p.add_(0.1 * torch.randn_like(p))
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=3,
                     image_size=SIZE, resize=CROP, mean=MEAN, std=STD, phase="meta", ways=3,
                     feature_norm="l2", inner_steps=STEPS, inner_lr=LR, source="synthetic")
    head = {"weight": 0.3 * torch.randn(3, backbone.out_dim), "bias": 0.1 * torch.randn(3)}
    model_dir = root / "model"
    save_model(model_dir / "model.safetensors", info, backbone.eval(), head)
    out = root / "eval"
    main(["meta-test", "--quiet", "--checkpoint", str(model_dir / "model.safetensors"),
          "--method", "mtl,ft,protonet", "--out", str(out),
          "--set", "data.name=folder", "--set", f"data.root={data}", "--set", "device=cpu",
          # fp32 on every CPU: bf16 rounds differently per batch, which is not what this
          # module tests (that meta-test and the API choose one precision: test_amp_choice)
          "--set", "amp=off", "--set", f"eval.episodes={EPISODES}", "--set", "eval.ways=[3]",
          "--set", "eval.shots=[1,2]", "--set", "eval.queries=3",
          "--set", f"eval.inner_steps={STEPS}", "--set", f"eval.inner_lr={LR}",
          # ft on the checkpoint's loop, not the default preset's own tuned one
          "--set", "eval.ft_inner_steps=null", "--set", "eval.ft_inner_lr=null"])
    results = json.loads((out / "results.json").read_text())
    per_episode = json.loads((out / "episodes.json").read_text())
    return {"data": data, "model": model_dir / "model.safetensors", "results": results,
            "episodes": per_episode, "root": root}


def episodes(world, shots: int):
    split = load_split(DataConfig(name="folder", root=str(world["data"]), image_size=SIZE,
                                  resize=CROP), "test")
    sampler = EpisodeSampler(split.indices_by_class, 3, shots, 3, seed=1234, name=split.name)
    return split, sampler


def files_of(world, split, indices) -> list[Path]:
    """The image files behind split rows (class folder c<k>, files sorted by name)."""
    out = []
    for i in indices:
        cls = split.class_names[split.labels[i]]
        rank = int(i - split.indices_by_class[split.labels[i]][0])
        out.append(sorted((world["data"] / "test" / cls).iterdir())[rank])
    return out


def test_meta_test_records_the_checkpoint_preprocessing(world) -> None:
    prep = world["results"]["preprocessing"]
    assert prep["image_size"] == SIZE and prep["resize"] == CROP
    assert prep["mean"] == MEAN and prep["std"] == STD
    assert prep["feature_norm"] == "l2" and prep["overridden"] == []
    assert "preprocessing_by_method" not in world["results"]


def test_crop_policy_is_torchvisions_resize_then_centre_crop(world) -> None:
    """The uint8 rows meta-test sees are the source's test transform, pixel for pixel."""
    split, _ = episodes(world, 1)
    path = sorted((world["data"] / "test" / "c2").iterdir())[3]
    theirs = transforms.Compose([transforms.Resize(22), transforms.CenterCrop(SIZE)])
    want = np.asarray(theirs(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(read_image(path, SIZE, 3, resize=CROP), want)
    row = split.indices_by_class[2][3]
    np.testing.assert_array_equal(split.images[row], want)
    np.testing.assert_array_equal(np.asarray(resize_pil(Image.open(path).convert("RGB"),
                                                        SIZE, CROP)), want)
    direct = read_image(path, SIZE, 3)
    assert np.abs(direct.astype(int) - want).mean() > 5  # the policies really differ


@pytest.mark.parametrize("method", ["mtl", "ft", "protonet"])
def test_api_reproduces_meta_test_per_episode(world, method) -> None:
    clf = FewShotClassifier.from_checkpoint(world["model"], method, "cpu", amp="off")
    assert clf.embedder.feature_norm == "l2"
    for shots in (1, 2):
        split, sampler = episodes(world, shots)
        accs = []
        for ep in range(EPISODES):
            batch = sampler.episode(ep)
            names = [split.class_names[c] for c in batch.classes[0]]
            support = {n: files_of(world, split, batch.support[0, j * shots:(j + 1) * shots])
                       for j, n in enumerate(names)}
            predicted = clf.fit(support).predict(files_of(world, split, batch.query[0]))
            truth = [names[j] for j in batch.query_labels()]
            accs.append(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
        reported = world["episodes"][f"{method}/3w{shots}s"]
        np.testing.assert_allclose(accs, reported, atol=1e-4)


@pytest.mark.parametrize("what", ["stats", "features", "resize"])
def test_controls_would_be_caught(world, what) -> None:
    """Each piece of the checkpoint's preprocessing changes meta-test's answers here, so
    the per-episode comparisons above would catch a tool that dropped one."""
    info, state, head = load_model(world["model"])
    changed = {m: [] for m in ("mtl", "ft", "protonet")}
    for shots in (1, 2):
        split, sampler = episodes(world, shots)
        if what == "resize":
            split = load_split(DataConfig(name="folder", root=str(world["data"]),
                                          image_size=SIZE), "test")
        for method in changed:
            backbone = build_backbone(info, state).eval()
            if method != "mtl":
                model = load_models(find_checkpoints(world["model"]), [method])[method]
                backbone = model.backbone.eval()
            mean, std = (split.mean, split.std) if what == "stats" else (MEAN, STD)
            norm = "none" if what == "features" else "l2"
            embedder = Embedder(backbone, Normalizer(mean, std, CPU), CPU, feature_norm=norm)
            use = (head["weight"], head["bias"]) if method == "mtl" else None
            acc = evaluate(make_method(method, STEPS, LR, use), embedder, split, sampler,
                           EPISODES)
            changed[method].append(not np.allclose(
                acc, world["episodes"][f"{method}/3w{shots}s"], atol=1e-4))
    if what == "features":  # protonet on L2 features vs raw ones; ft's inner loop too
        assert any(changed["ft"]) and any(changed["protonet"])
    else:
        assert all(any(v) for v in changed.values()), changed


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("method", ["mtl", "ft", "protonet"])
def test_adapt_cli_and_serve_agree_with_the_api(world, method, tmp_path, capsys) -> None:
    pytest.importorskip("flask")
    from metatransfer.serve import create_app

    split, sampler = episodes(world, 2)
    batch = sampler.episode(0)
    names = [split.class_names[c] for c in batch.classes[0]]
    support = {n: files_of(world, split, batch.support[0, j * 2:(j + 1) * 2])
               for j, n in enumerate(names)}
    names = sorted(names)  # adapt takes the class folders in name order (mtl's theta_0 rows)
    support = {n: support[n] for n in names}
    queries = files_of(world, split, batch.query[0])
    clf = FewShotClassifier.from_checkpoint(world["model"], method, "cpu")
    probs = clf.fit(support).predict_proba(queries)

    folder = tmp_path / "support"
    for n, paths in support.items():
        (folder / n).mkdir(parents=True)
        for p in paths:
            (folder / n / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "pred.json"
    main(["adapt", "--checkpoint", str(world["model"]), "--method", method, "--device", "cpu",
          "--support", str(folder), "--query", *map(str, queries), "--top", "3",
          "--output", str(out)])
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["classes"] == names
    for p, row in zip(doc["predictions"], probs, strict=True):
        got = {t["class"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[c] for c in doc["classes"]], row, rtol=1e-5,
                                   atol=1e-6)

    client = create_app(world["model"], device="cpu").test_client()
    data = {"classes": json.dumps(names), "method": method}
    for i, n in enumerate(names):
        data[f"support-{i}"] = [(io.BytesIO(_png(p)), p.name) for p in support[n]]
    data["query"] = [(io.BytesIO(_png(p)), f"q{j}.png") for j, p in enumerate(queries)]
    res = client.post("/api/predict", data=data, content_type="multipart/form-data")
    assert res.status_code == 200, res.get_json()
    np.testing.assert_allclose([p["probabilities"] for p in res.get_json()["predictions"]],
                               probs, rtol=1e-5, atol=1e-6)


def test_overrides_are_logged_and_recorded(world, tmp_path, caplog) -> None:
    out = tmp_path / "eval"
    with caplog.at_level("WARNING"):
        main(["meta-test", "--quiet", "--checkpoint", str(world["model"]), "--method", "mtl",
              "--out", str(out), "--set", "data.name=folder",
              "--set", f"data.root={world['data']}", "--set", "device=cpu",
              "--set", "eval.episodes=2", "--set", "eval.ways=[3]", "--set", "eval.shots=[1]",
              "--set", "eval.queries=3", "--set", "data.stats=dataset",
              "--set", "data.image_size=20", "--set", "data.resize=direct"])
    prep = json.loads((out / "results.json").read_text())["preprocessing"]
    assert prep["overridden"] == ["image_size", "resize", "stats"]
    assert (prep["image_size"], prep["resize"]) == (20, "direct")
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)  # the folder's own
    text = caplog.text
    assert "overrides the checkpoint's 16" in text and "data.stats=dataset" in text


def test_old_checkpoints_load_with_direct_resize(world, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(world["model"]), framework="pt") as fh:
        meta = json.loads(fh.metadata()["metatransfer"])
    del meta["resize"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(world["model"])), str(old), {"metatransfer": json.dumps(meta)})
    info, _, _ = load_model(old)
    assert info.resize == "direct"
    clf = FewShotClassifier.from_checkpoint(old, "protonet", "cpu")
    assert clf.preprocess([picture(0, 0)]).shape == (1, SIZE, SIZE, 3)


# ----------------------------------------------------------- baselines: the pre-trained net


def _meta_with_bn_changed(tmp_path: Path, extra: dict) -> tuple[Path, Path]:
    torch.manual_seed(1)
    pre = create_backbone("conv4", in_channels=3, width=8)
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, image_size=SIZE,
                     mean=MEAN, std=STD)
    run = tmp_path / "run"
    save_model(run / "pretrain_best.safetensors", info, pre)
    meta = create_backbone("conv4", in_channels=3, width=8)
    meta.load_state_dict(pre.state_dict())
    enable_ss(meta)
    with torch.no_grad():  # BN moved during meta-training
        for m in meta.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.5)
    meta_info = ModelInfo(**{**info.__dict__, "phase": "meta", "ways": 3, "extra": extra})
    save_model(run / "meta_best.safetensors", meta_info, meta,
               {"weight": torch.zeros(3, 8), "bias": torch.zeros(3)})
    return run / "meta_best.safetensors", run / "pretrain_best.safetensors"


@pytest.mark.parametrize("extra", [{"bn_mode": "train"}, {"bn_affine": True},
                                   {"import_format": "authors-meta"}])
def test_baselines_use_the_pretrained_network(tmp_path, extra) -> None:
    meta, pre = _meta_with_bn_changed(tmp_path, extra)
    models = load_models(find_checkpoints(meta), ["ft", "protonet"])  # found beside it
    pre_state = load_model(pre)[1]
    for method in ("ft", "protonet"):
        state = models[method].backbone.state_dict()
        assert not any(k.endswith("ss_scale") for k in state)
        for k, v in pre_state.items():
            torch.testing.assert_close(state[k], v)
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(meta.read_bytes())
    with pytest.raises(MTLError, match="pass --pretrained") as err:
        load_models(find_checkpoints(alone), ["ft"])
    assert "\n" not in str(err.value) and "not" in str(err.value)
    clf = FewShotClassifier.from_checkpoint(meta.parent, "ft", "cpu")
    for k, v in pre_state.items():
        torch.testing.assert_close(clf.embedder.backbone.state_dict()[k], v)


def test_meta_train_from_pretrained_uses_its_preprocessing(tmp_path) -> None:
    """meta-train standardises with the pre-trained checkpoint's statistics (not the
    split's) and writes them, its resize policy and meta.bn_mode into the meta model."""
    from conftest import tiny_overrides

    from metatransfer.cli import main as cli_main

    torch.manual_seed(2)
    pre = create_backbone("conv4", in_channels=1, width=8)
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=1,
                     image_size=16, resize="crop:18", mean=[0.3], std=[0.2])
    save_model(tmp_path / "pre.safetensors", info, pre)
    out = tmp_path / "run"
    args = ["meta-train", "--quiet", "--pretrained", str(tmp_path / "pre.safetensors")]
    for item in tiny_overrides(out) + ["meta.epochs=1", "meta.bn_mode=train"]:
        args += ["--set", item]
    cli_main(args)
    meta, _, _ = load_model(out / "meta_best.safetensors")
    assert (meta.mean, meta.std, meta.resize) == ([0.3], [0.2], "crop:18")
    assert meta.extra["bn_mode"] == "train"
