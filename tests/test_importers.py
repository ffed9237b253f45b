"""Importers: published checkpoint layouts -> our checkpoints, reproducing the sources.

Each test writes a state dict with exactly the source's key layout and tensor shapes
(random values, saved with ``torch.save`` in the source's container), imports it, and
compares our rebuilt model with a small functional re-implementation of the source's
forward pass computed from the raw state dict, in eval mode.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from metatransfer.checkpoints import build_backbone, load_model
from metatransfer.errors import CheckpointError, ConfigError
from metatransfer.importers import IMPORT_FORMATS, import_checkpoint, main_import

State = "OrderedDict[str, torch.Tensor]"

# --- source layouts (written from the published code's module structure) ---------------


def _conv(sd, name, cin, cout, k, *, bias: bool, mtl: bool, g: torch.Generator) -> None:
    """nn.Conv2d: weight, bias. The authors' Conv2dMtl: weight, mtl_weight, bias, mtl_bias
    (no mtl_bias without bias)."""
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    if mtl:
        sd[f"{name}.mtl_weight"] = 0.5 + torch.rand(cout, cin, 1, 1, generator=g)
    if bias:
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g)
        if mtl:
            sd[f"{name}.mtl_bias"] = 0.1 * torch.randn(cout, generator=g)


def _bn(sd, name, ch, g: torch.Generator, counter: bool = True) -> None:
    sd[f"{name}.weight"] = 0.5 + torch.rand(ch, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(ch, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(ch, generator=g)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(ch, generator=g)
    if counter:
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1234, dtype=torch.long)


def authors_encoder(mtl: bool, widths=(160, 320, 640), blocks=4, seed=0,
                    counter: bool = True) -> State:
    """ResNetMtl: conv1 (with bias) + bn1, layer1..3 of BasicBlock(Mtl), downsample on the
    first block of each layer."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict = OrderedDict()
    stem = widths[0] // 2
    _conv(sd, "conv1", 3, stem, 3, bias=True, mtl=mtl, g=g)
    _bn(sd, "bn1", stem, g, counter)
    cin = stem
    for li, w in enumerate(widths, 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            _conv(sd, f"{p}.conv1", cin if b == 0 else w, w, 3, bias=False, mtl=mtl, g=g)
            _bn(sd, f"{p}.bn1", w, g, counter)
            _conv(sd, f"{p}.conv2", w, w, 3, bias=False, mtl=mtl, g=g)
            _bn(sd, f"{p}.bn2", w, g, counter)
            if b == 0:
                _conv(sd, f"{p}.downsample.0", cin, w, 1, bias=False, mtl=mtl, g=g)
                _bn(sd, f"{p}.downsample.1", w, g, counter)
        cin = w
    return sd


def res12_encoder(widths=(64, 160, 320, 640), seed=0) -> State:
    """RFS / FEAT ResNet-12: layerI.0.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.{0,1}}."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict = OrderedDict()
    cin = 3
    for li, w in enumerate(widths, 1):
        p = f"layer{li}.0"
        for j, c in ((1, cin), (2, w), (3, w)):
            _conv(sd, f"{p}.conv{j}", c, w, 3, bias=False, mtl=False, g=g)
            _bn(sd, f"{p}.bn{j}", w, g)
        _conv(sd, f"{p}.downsample.0", cin, w, 1, bias=False, mtl=False, g=g)
        _bn(sd, f"{p}.downsample.1", w, g)
        cin = w
    return sd


# --- independent functional forwards of the sources --------------------------------------


def f_conv(sd, name, x, stride=1, padding=0):
    w = sd[f"{name}.weight"]
    if f"{name}.mtl_weight" in sd:
        w = w.mul(sd[f"{name}.mtl_weight"].expand(w.shape))
    b = sd.get(f"{name}.bias")
    if b is not None and f"{name}.mtl_bias" in sd:
        b = b + sd[f"{name}.mtl_bias"]
    return F.conv2d(x, w, b, stride, padding)


def f_bn(sd, name, x):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training=False, eps=1e-5)


def authors_forward(sd, x, blocks=4, avgpool10=True):
    x = F.relu(f_bn(sd, "bn1", f_conv(sd, "conv1", x, 1, 1)))
    for li in (1, 2, 3):
        for b in range(blocks):
            p, stride = f"layer{li}.{b}", (2 if b == 0 else 1)
            out = F.relu(f_bn(sd, f"{p}.bn1", f_conv(sd, f"{p}.conv1", x, stride, 1)))
            out = f_bn(sd, f"{p}.bn2", f_conv(sd, f"{p}.conv2", out, 1, 1))
            if f"{p}.downsample.0.weight" in sd:
                x = f_bn(sd, f"{p}.downsample.1", f_conv(sd, f"{p}.downsample.0", x, stride))
            x = F.relu(out + x)
    # the source's AvgPool2d(10, stride=1) at 80x80 input; global mean elsewhere
    x = F.avg_pool2d(x, 10, stride=1) if avgpool10 else x.mean((2, 3), keepdim=True)
    return x.flatten(1)


def res12_forward(sd, x, avgpool5=False):
    act = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
    for li in (1, 2, 3, 4):
        p = f"layer{li}.0"
        out = act(f_bn(sd, f"{p}.bn1", f_conv(sd, f"{p}.conv1", x, 1, 1)))
        out = act(f_bn(sd, f"{p}.bn2", f_conv(sd, f"{p}.conv2", out, 1, 1)))
        out = f_bn(sd, f"{p}.bn3", f_conv(sd, f"{p}.conv3", out, 1, 1))
        res = f_bn(sd, f"{p}.downsample.1", f_conv(sd, f"{p}.downsample.0", x))
        x = F.max_pool2d(act(out + res), 2)
    # FEAT: AvgPool2d(5, stride=1) at 84x84; RFS: AdaptiveAvgPool2d(1)
    x = F.avg_pool2d(x, 5, stride=1) if avgpool5 else F.adaptive_avg_pool2d(x, 1)
    return x.flatten(1)


def _ours(out_path):
    info, state, head = load_model(out_path)
    return info, build_backbone(info, state).eval(), head


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


# --- the four formats --------------------------------------------------------------------


@pytest.mark.parametrize("prefixed", [False, True])
def test_authors_pretrain_reproduces_source(tmp_path, prefixed: bool) -> None:
    enc = authors_encoder(mtl=False, seed=1)
    params = OrderedDict((("encoder." + k) if prefixed else k, v) for k, v in enc.items())
    if prefixed:  # the whole pre-train MtlLearner, classifier included
        params["pre_fc.0.weight"] = torch.randn(1000, 640)
        params["pre_fc.0.bias"] = torch.randn(1000)
        params["pre_fc.2.weight"] = torch.randn(64, 1000)
        params["pre_fc.2.bias"] = torch.randn(64)
    torch.save({"params": params}, tmp_path / "max_acc.pth")
    summary = main_import("authors-pretrain", tmp_path / "max_acc.pth", tmp_path / "o.safetensors")
    info, model, head = _ours(tmp_path / "o.safetensors")
    assert (info.backbone, info.phase, info.image_size) == ("resnet25", "imported", 80)
    assert info.resize == "crop:92"  # their test transform: Resize(92) -> CenterCrop(80)
    assert info.ways == 0
    assert info.mean == pytest.approx([125.3 / 255, 123.0 / 255, 113.9 / 255])
    assert head == {}
    assert not any(k.endswith("ss_scale") for k in model.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        _close(model(x), authors_forward(enc, x, avgpool10=False))
    if prefixed:
        assert "ignored 4 source tensors" in summary and "pre_fc.2.weight" in summary
    assert "mapped" in summary


def test_authors_meta_reproduces_source_and_theta0(tmp_path) -> None:
    enc = authors_encoder(mtl=True, seed=2)
    fc1_w = torch.randn(5, 640) * 0.05
    fc1_b = torch.randn(5) * 0.1
    # MtlLearner.state_dict(): BaseLearner's own params, then its ParameterList alias
    params = OrderedDict([("base_learner.fc1_w", fc1_w), ("base_learner.fc1_b", fc1_b),
                          ("base_learner.vars.0", fc1_w), ("base_learner.vars.1", fc1_b)])
    params.update(("encoder." + k, v) for k, v in enc.items())
    torch.save({"params": params}, tmp_path / "max_acc.pth")
    summary = main_import("authors-meta", tmp_path / "max_acc.pth", tmp_path / "m.safetensors")
    info, model, head = _ours(tmp_path / "m.safetensors")
    assert (info.backbone, info.phase, info.ways) == ("resnet25", "meta", 5)
    assert (info.inner_steps, info.inner_lr, info.image_size) == (100, 0.01, 80)
    assert torch.equal(head["weight"], fc1_w) and torch.equal(head["bias"], fc1_b)
    # SS on every conv (the authors' scope), per-kernel scale
    state = model.state_dict()
    assert torch.equal(state["conv1.ss_scale"], enc["conv1.mtl_weight"])
    assert torch.equal(state["conv1.ss_shift"], enc["conv1.mtl_bias"])
    assert torch.equal(state["layer2.0.downsample.0.ss_scale"],
                       enc["layer2.0.downsample.0.mtl_weight"])
    assert not state["layer1.0.conv1.ss_shift"].any()
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        feats, ref = model(x), authors_forward(enc, x, avgpool10=True)
        _close(feats, ref)
        _close(F.linear(feats, head["weight"], head["bias"]), F.linear(ref, fc1_w, fc1_b))
    assert "base_learner.vars.0: alias of base_learner.fc1_w" in summary
    assert "encoder.<conv>.mtl_weight -> <conv>.ss_scale" in summary


@pytest.mark.parametrize("prefix", ["encoder.", "encoder.module."])  # multi-GPU FEAT
def test_feat_reproduces_source(tmp_path, prefix: str) -> None:
    enc = res12_encoder(seed=3)
    params = OrderedDict((prefix + k, v) for k, v in enc.items())
    params["fc.weight"] = torch.randn(64, 640)  # FEAT's pre-training Classifier head
    params["fc.bias"] = torch.randn(64)
    params["slf_attn.w_qs.weight"] = torch.randn(640, 640)  # a FEAT model's attention
    torch.save({"params": params}, tmp_path / "Res12-pre.pth")
    info = import_checkpoint("feat", tmp_path / "Res12-pre.pth", tmp_path / "f.safetensors")
    assert (info.backbone, info.image_size, info.phase) == ("resnet12", 84, "imported")
    assert info.resize == "crop:92"  # FEAT's test transform: Resize(92) -> CenterCrop(84)
    _, model, _ = _ours(tmp_path / "f.safetensors")
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        _close(model(x), res12_forward(enc, x, avgpool5=True))


def test_rfs_reproduces_source(tmp_path) -> None:
    enc = res12_encoder(seed=4)
    model_sd = OrderedDict(enc)
    model_sd["classifier.weight"] = torch.randn(64, 640)
    model_sd["classifier.bias"] = torch.randn(64)
    opt = argparse.Namespace(model="resnet12", dataset="miniImageNet", n_ways=5)
    torch.save({"opt": opt, "model": model_sd}, tmp_path / "resnet12_last.pth")
    summary = main_import("rfs", tmp_path / "resnet12_last.pth", tmp_path / "r.safetensors")
    info, model, _ = _ours(tmp_path / "r.safetensors")
    assert info.backbone == "resnet12" and info.backbone_args["dropblock_size"] == 5
    assert (info.image_size, info.resize) == (84, "direct")  # RFS: 84 px pickles as they are
    assert info.extra["dataset"] == "miniimagenet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model(x), res12_forward(enc, x))
    assert "classifier.weight: RFS pre-training classifier" in summary
    assert f"mapped {len(enc)} tensors ({len(enc)} by name, 0 renamed)" in summary


def test_rfs_dataparallel_prefix_is_stripped(tmp_path) -> None:
    enc = res12_encoder(seed=5)
    torch.save({"epoch": 90, "model": OrderedDict(("module." + k, v) for k, v in enc.items())},
               tmp_path / "ckpt.pth")
    import_checkpoint("rfs", tmp_path / "ckpt.pth", tmp_path / "r.safetensors")
    _, state, _ = load_model(tmp_path / "r.safetensors")
    assert torch.equal(state["layer3.0.conv2.weight"], enc["layer3.0.conv2.weight"])


def test_old_checkpoint_without_bn_counters_is_filled(tmp_path) -> None:
    """The authors used PyTorch 0.4: legacy (non-zip) files, BN without batch counters."""
    enc = authors_encoder(mtl=False, counter=False, seed=6)
    torch.save({"params": enc}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    summary = main_import("authors-pretrain", tmp_path / "old.pth", tmp_path / "o.safetensors")
    assert "BN batch counter absent" in summary


# --- documented errors -------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def rfs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rfs") / "rfs.pth"
    torch.save({"model": res12_encoder(seed=7)}, path)
    return path


def test_truncated_file(tmp_path, rfs_file) -> None:
    data = rfs_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("rfs", tmp_path / "cut.pth", tmp_path / "o.safetensors")
    assert "truncated" in _one_line(err)
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        import_checkpoint("rfs", tmp_path / "nope.pth", tmp_path / "o.safetensors")


def test_wrong_format_name(tmp_path, rfs_file) -> None:
    with pytest.raises(ConfigError) as err:
        import_checkpoint("rfss", rfs_file, tmp_path / "o.safetensors")
    msg = _one_line(err)
    assert all(name in msg for name in IMPORT_FORMATS)


def test_wrong_container_for_format(tmp_path, rfs_file) -> None:
    with pytest.raises(CheckpointError) as err:  # RFS file read as FEAT: no 'params'
        import_checkpoint("feat", rfs_file, tmp_path / "o.safetensors")
    assert "'params'" in _one_line(err)


def test_different_width_resnet12(tmp_path) -> None:
    torch.save({"model": res12_encoder(widths=(64, 128, 256, 512))}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("rfs", tmp_path / "w.pth", tmp_path / "o.safetensors")
    msg = _one_line(err)
    assert "'layer2.0.conv1.weight'" in msg and "(128, 64, 3, 3)" in msg


def test_different_width_resnet25(tmp_path) -> None:
    enc = authors_encoder(mtl=False, widths=(128, 256, 512), blocks=3)
    torch.save({"params": enc}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("authors-pretrain", tmp_path / "w.pth", tmp_path / "o.safetensors")
    assert "'conv1.weight'" in _one_line(err)


def test_unknown_source_tensor_is_an_error(tmp_path) -> None:
    sd = res12_encoder(seed=8)
    sd["layer1.0.se.fc.0.weight"] = torch.randn(16, 64)  # an SE-ResNet-12 from RFS
    torch.save({"model": sd}, tmp_path / "se.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("rfs", tmp_path / "se.pth", tmp_path / "o.safetensors")
    assert "'layer1.0.se.fc.0.weight'" in _one_line(err)


def test_missing_target_tensor_is_an_error(tmp_path) -> None:
    sd = res12_encoder(seed=9)
    del sd["layer4.0.bn3.running_var"]
    torch.save({"model": sd}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("rfs", tmp_path / "cut.pth", tmp_path / "o.safetensors")
    assert "'layer4.0.bn3.running_var'" in _one_line(err)


def test_meta_and_pretrain_formats_are_told_apart(tmp_path) -> None:
    small = dict(widths=(160, 320, 640), blocks=3)
    torch.save({"params": authors_encoder(mtl=True, **small)}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="authors-meta"):
        import_checkpoint("authors-pretrain", tmp_path / "meta.pth", tmp_path / "o.safetensors")
    torch.save({"params": authors_encoder(mtl=False, **small)}, tmp_path / "pre.pth")
    with pytest.raises(CheckpointError, match="authors-pretrain"):
        import_checkpoint("authors-meta", tmp_path / "pre.pth", tmp_path / "o.safetensors")


class Opaque:
    """An arbitrary pickled object: never unpickled (weights_only)."""


def test_non_tensor_pickles_are_refused(tmp_path) -> None:
    torch.save({"model": res12_encoder(seed=10), "x": Opaque()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("rfs", tmp_path / "obj.pth", tmp_path / "o.safetensors")
    assert "Opaque" in _one_line(err)


# --- older authors' ResNet, RFS on CIFAR, variants refused ----------------------------------


@pytest.mark.parametrize("fmt", ["authors-pretrain", "authors-meta"])
def test_authors_older_resnet_with_three_blocks(tmp_path, fmt: str) -> None:
    """ResNetMtl(layers=[3, 3, 3]): their repository from 2019-08 until commit a43f94a."""
    enc = authors_encoder(mtl=fmt == "authors-meta", blocks=3, seed=11)
    params = OrderedDict(("encoder." + k, v) for k, v in enc.items())
    if fmt == "authors-meta":
        params["base_learner.fc1_w"] = torch.randn(5, 640)
        params["base_learner.fc1_b"] = torch.randn(5)
    torch.save({"params": params}, tmp_path / "old.pth")
    info = import_checkpoint(fmt, tmp_path / "old.pth", tmp_path / "o.safetensors")
    assert info.backbone_args == {"blocks": 3}
    _, model, _ = _ours(tmp_path / "o.safetensors")
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        _close(model(x), authors_forward(enc, x, blocks=3, avgpool10=True))


def test_unreleased_authors_variant_is_refused(tmp_path) -> None:
    torch.save({"params": authors_encoder(mtl=False, blocks=2)}, tmp_path / "v.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint("authors-pretrain", tmp_path / "v.pth", tmp_path / "o.safetensors")
    msg = _one_line(err)
    assert "layers=[2, 2, 2]" in msg and "cannot be imported" in msg
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("rfs_name,ours", [("CIFAR-FS", "cifarfs"), ("FC100", "fc100")])
def test_rfs_cifar_gets_cifar_metadata(tmp_path, rfs_name: str, ours: str) -> None:
    enc = res12_encoder(seed=12)
    opt = argparse.Namespace(model="resnet12", dataset=rfs_name, n_ways=5)
    torch.save({"opt": opt, "model": enc}, tmp_path / "cifar.pth")
    summary = main_import("rfs", tmp_path / "cifar.pth", tmp_path / "c.safetensors")
    info, model, _ = _ours(tmp_path / "c.safetensors")
    assert (info.image_size, info.resize, info.extra["dataset"]) == (32, "direct", ours)
    assert info.mean == pytest.approx([129.37731888 / 255, 124.10583864 / 255,
                                       112.47758569 / 255])
    assert info.std == pytest.approx([68.20947949 / 255, 65.43124043 / 255,
                                      70.45866994 / 255])
    assert info.backbone_args["dropblock_size"] == 2
    assert "32 px" in summary
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model(x), res12_forward(enc, x))


def test_rfs_dataset_chosen_at_import_or_contradicted(tmp_path) -> None:
    enc = res12_encoder(seed=13)
    torch.save({"model": enc}, tmp_path / "bare.pth")  # no options stored
    info = import_checkpoint("rfs", tmp_path / "bare.pth", tmp_path / "b.safetensors",
                             dataset="fc100")
    assert info.image_size == 32 and info.extra["dataset"] == "fc100"
    info = import_checkpoint("rfs", tmp_path / "bare.pth", tmp_path / "b.safetensors",
                             image_size=40)
    assert info.image_size == 40 and info.extra["image_size_overridden"]["source"] == 84
    opt = argparse.Namespace(dataset="miniImageNet")
    torch.save({"opt": opt, "model": enc}, tmp_path / "mini.pth")
    with pytest.raises(CheckpointError, match="drop --dataset"):
        import_checkpoint("rfs", tmp_path / "mini.pth", tmp_path / "x.safetensors",
                          dataset="cifarfs")
    torch.save({"opt": argparse.Namespace(dataset="CUB"), "model": enc}, tmp_path / "cub.pth")
    with pytest.raises(CheckpointError, match="'CUB'"):
        import_checkpoint("rfs", tmp_path / "cub.pth", tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="ImageNet-style data only"):
        import_checkpoint("feat", tmp_path / "bare.pth", tmp_path / "x.safetensors",
                          dataset="cifarfs")
