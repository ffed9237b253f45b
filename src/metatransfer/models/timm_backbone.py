"""Any timm network as a backbone: ``model.backbone=timm:<name>``.

timm is the standard collection of vision architectures with one contract for all of them
(``forward_features``, ``forward_head``, ``num_features``, ``feature_info``), so one small
wrapper gives this package every one of them. The features are timm's pre-logits (global
pool, before the classifier), ``out_dim`` is ``num_features``; the network is built
without weights (nothing is ever downloaded at run time): weights come from a checkpoint
(``mtl import efficientnet-lite0`` / ``mtl import timm NAME --weights FILE``).

SS attaches to its convs and linear layers through :func:`metatransfer.models.ss.enable_ss`;
``stages()`` follows timm's ``feature_info``, so SS scope ``last`` is the last feature
stage together with whatever follows it (e.g. EfficientNet's ``conv_head``).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import ConfigError

PREFIX = "timm:"


def require_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm backbones need the timm package: pip install timm "
                          "(or pip install -e '.[imagenet]')") from None
    return timm


class TimmBackbone(nn.Module):
    """A timm network without its classifier: ``(batch, c, h, w) -> (batch, num_features)``.

    ``drop_rate`` (dropout before timm's classifier, which ``forward_head`` applies to the
    pre-logits in training mode) defaults to 0: the features feed a few-shot learner, not
    timm's head. Other keyword arguments go to ``timm.create_model``.
    """

    def __init__(self, name: str, in_channels: int = 3, drop_rate: float = 0.0,
                 **kwargs) -> None:
        super().__init__()
        timm = require_timm()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"timm has no model '{name}'{hint}; `timm.list_models()` lists "
                              "them")
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0,
                                           in_chans=in_channels, drop_rate=drop_rate, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"timm model '{name}' does not accept model.backbone_args "
                              f"{sorted(kwargs)} ({exc})") from None
        self.timm_name = name
        self.out_dim = int(self.model.num_features)

    def stages(self) -> list[nn.Module]:
        """timm's feature stages; the last one includes every top-level layer after it."""
        info = getattr(self.model, "feature_info", None)
        names = [f["module"] for f in info] if info else []
        modules = dict(self.model.named_modules())
        stages = [modules[n] for n in names if n in modules]
        if not stages:
            return [self.model]
        last_top = names[-1].split(".")[0]
        children = list(self.model.named_children())
        after = [m for i, (n, m) in enumerate(children)
                 if i > [c for c, _ in children].index(last_top)]
        stages[-1] = nn.ModuleList([stages[-1], *after])
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def create_timm_backbone(name: str, in_channels: int = 3, **kwargs) -> TimmBackbone:
    return TimmBackbone(name[len(PREFIX):] if name.startswith(PREFIX) else name,
                        in_channels=in_channels, **kwargs)
