"""ResNet backbones: shapes, SS at initialisation, freezing, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from metatransfer.checkpoints import ModelInfo, build_backbone, load_model, save_model
from metatransfer.errors import ConfigError
from metatransfer.models import SSConv2d, create_backbone, enable_ss, ss_convs
from metatransfer.models.resnets import DropBlock

RESNETS = {"resnet12": 640, "resnet12-tf": 512, "resnet25": 640}
# narrow versions for checks that do not depend on width (fast on a shared 2-core CPU)
SMALL = {"resnet12": {"widths": [16, 24, 32, 40]}, "resnet12-tf": {"widths": [8, 16, 24, 32]},
         "resnet25": {"widths": [16, 32, 48], "blocks": 2}}


def _eval_model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_backbone(name, **kw)
    # non-trivial BN statistics so that SS/round-trip checks see every tensor
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet12", "resnet12-tf", "resnet25"])
@pytest.mark.parametrize("size", [32, 40])
def test_output_shape_any_input_size(name: str, size: int) -> None:
    model = _eval_model(name)
    assert model.out_dim == RESNETS[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, RESNETS[name])
    assert torch.isfinite(out).all()


def test_resnet25_at_its_native_80() -> None:
    model = _eval_model("resnet25")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 80, 80)).shape == (1, 640)


def test_in_channels_and_widths_kwargs() -> None:
    model = _eval_model("resnet12", in_channels=1, widths=(8, 16, 24, 32))
    assert model.out_dim == 32
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    small25 = _eval_model("resnet25", in_channels=1, widths=(8, 16, 32), blocks=1)
    assert small25.out_dim == 32 and small25(torch.randn(1, 1, 24, 24)).shape == (1, 32)


@pytest.mark.parametrize("name", ["resnet12", "resnet12-tf", "resnet25"])
def test_every_conv_is_ss_and_stages(name: str) -> None:
    model = create_backbone(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(c, SSConv2d) for c in convs)
    stages = model.stages()
    assert len(stages) == (3 if name == "resnet25" else 4)
    assert all(any(True for _ in ss_convs(s)) for s in stages)


def test_key_layouts_match_the_published_models() -> None:
    keys12 = create_backbone("resnet12").state_dict().keys()
    for k in ("layer1.0.conv1.weight", "layer4.0.conv3.weight", "layer3.0.bn2.running_var",
              "layer4.0.downsample.0.weight", "layer4.0.downsample.1.num_batches_tracked"):
        assert k in keys12
    keys25 = create_backbone("resnet25").state_dict().keys()
    for k in ("conv1.weight", "conv1.bias", "bn1.running_mean", "layer1.0.conv1.weight",
              "layer1.0.downsample.0.weight", "layer3.3.bn2.weight"):
        assert k in keys25
    assert "layer1.1.downsample.0.weight" not in keys25


@pytest.mark.parametrize("name", ["resnet12", "resnet12-tf", "resnet25"])
@pytest.mark.parametrize("scope", ["all", "last"])
@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_ss_equals_plain_backbone_at_init(name, scope, granularity) -> None:
    model = _eval_model(name, **SMALL[name])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        enable_ss(model, granularity=granularity, scope=scope)
        ss = model(x)
    torch.testing.assert_close(ss, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["all", "last"])
def test_enable_ss_freezes_and_returns_only_ss(scope: str) -> None:
    model = create_backbone("resnet12", **SMALL["resnet12"])
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = enable_ss(model, granularity="kernel", scope=scope)
    scoped = model if scope == "all" else model.stages()[-1]
    n_convs = sum(1 for _ in ss_convs(scoped))
    assert len(params) == 2 * n_convs
    ss_ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        is_ss = name.endswith(("ss_scale", "ss_shift"))
        assert p.requires_grad == (id(p) in ss_ids), name
        if not is_ss:
            assert not p.requires_grad and torch.equal(p, frozen_before[name])
    if scope == "last":
        assert all(not c.ss_enabled for c in ss_convs(model.stages()[0]))
    for conv in ss_convs(scoped):  # per-kernel scale, per-channel shift
        assert conv.ss_scale.shape == (*conv.weight.shape[:2], 1, 1)
        assert conv.ss_shift.shape == (conv.out_channels,)


def test_enable_ss_with_bn_affine_adds_bn_params() -> None:
    model = create_backbone("resnet25", **SMALL["resnet25"])
    params = enable_ss(model, scope="last", bn_affine=True)
    last = model.stages()[-1]
    n_bn = sum(1 for m in last.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(params) == 2 * sum(1 for _ in ss_convs(last)) + 2 * n_bn


@pytest.mark.parametrize("name,scope,granularity", [
    ("resnet12", "all", "kernel"), ("resnet12", "last", "channel"),
    ("resnet12-tf", "all", "channel"), ("resnet25", "last", "kernel"),
])
def test_checkpoint_round_trip_with_ss(tmp_path, name, scope, granularity) -> None:
    model = _eval_model(name, **SMALL[name])
    enable_ss(model, granularity=granularity, scope=scope)
    with torch.no_grad():
        for conv in ss_convs(model):
            if conv.ss_enabled:
                conv.ss_scale.uniform_(0.8, 1.2)
                conv.ss_shift.normal_(0, 0.05)
    head = {"weight": torch.randn(5, model.out_dim), "bias": torch.randn(5)}
    info = ModelInfo(backbone=name, backbone_args=SMALL[name], phase="meta", ways=5,
                     image_size=32)
    save_model(tmp_path / "m.safetensors", info, model, head)
    info2, state, head2 = load_model(tmp_path / "m.safetensors")
    rebuilt = build_backbone(info2, state).eval()
    assert info2 == info
    for a, b in zip(ss_convs(model), ss_convs(rebuilt), strict=True):
        assert a.ss_enabled == b.ss_enabled
        if a.ss_enabled:
            assert a.ss_scale.shape == b.ss_scale.shape
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert torch.equal(head2["weight"], head["weight"])


def test_unknown_backbone_lists_names() -> None:
    with pytest.raises(ConfigError) as err:
        create_backbone("resnet13")
    msg = str(err.value)
    for name in ("conv4", "resnet12", "resnet12-tf", "resnet25"):
        assert name in msg


def test_dropblock_acts_only_in_training() -> None:
    torch.manual_seed(0)
    drop = DropBlock(drop_rate=0.3, block_size=3)
    x = torch.ones(4, 8, 10, 10)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    zero = y == 0
    assert 0.1 < zero.float().mean() < 0.5  # roughly drop_rate of the units
    assert torch.allclose(y[~zero], y[~zero][0])  # kept units rescaled uniformly
    assert y.mean().item() == pytest.approx(1.0, rel=1e-5)
    # blocks are contiguous: every dropped unit has a dropped neighbour
    z = torch.nn.functional.pad(zero.float(), (1, 1, 1, 1))
    neigh = z[..., :-2, 1:-1] + z[..., 2:, 1:-1] + z[..., 1:-1, :-2] + z[..., 1:-1, 2:]
    assert (neigh[zero] > 0).all()
    # blocks larger than the map are clamped (e.g. 32x32 input -> 2x2 maps)
    assert drop.train()(torch.ones(2, 3, 2, 2)).shape == (2, 3, 2, 2)


def test_resnet12_train_mode_is_stochastic_eval_is_not() -> None:
    model = _eval_model("resnet12", widths=(8, 8, 16, 16))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.equal(a, b)
