"""Frozen BatchNorm folded into the conv before it: one op where there were two.

In eval mode a BatchNorm is a per-channel affine map, ``BN(y) = (y - mu) * s + beta`` with
``s = gamma / sqrt(var + eps)``. When ``y`` is an SS conv's output,
``y = conv(x; W * Phi_S1) + (b + Phi_S2)`` (:class:`~.ss.SSConv2d`; an attached SS adds
Phi_S2 to the output, the same thing), so

    BN(y) = conv(x; (W * Phi_S1) * s) + ((b + Phi_S2 - mu) * s + beta)

(``b`` = 0 for a conv without bias): a single convolution with its weight scaled per
output channel and a new bias. The BN's own passes over the activations, forward and
backward, disappear; the fused weight and bias are recomputed from Phi (and gamma, beta)
at every call, so the gradients reach Phi_S1, Phi_S2 and meta-learned BN affine
parameters as they do through the two ops. The result equals the unfolded network up to
float rounding.

Folding is exact only where the conv's output feeds that BN and nothing else, and where
the BN normalises with its running statistics. :func:`conv_bn_pairs` proves the first on
the network's graph (``torch.fx``, built-in backbones and timm networks alike, for the
conv and BN classes whose forward is known to be linear in the weight and bias); the
second is checked at every call, so a BN in training mode (``meta.bn_mode=train``) or
without running statistics is never folded. :func:`folded_bn` turns folding on for a
block of code, e.g. one meta-training forward pass or one embedding pass.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ss import ScaleShift, SSConv2d, WeightBias, make_ss_capable

log = logging.getLogger(__name__)

Pair = tuple[ScaleShift, _BatchNorm]


def frozen_statistics(bn: _BatchNorm) -> bool:
    """Whether ``bn`` normalises with its running statistics now (eval mode, statistics
    kept): then it is a fixed affine map and can be folded."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


@dataclass(frozen=True)
class BNFold:
    """The affine map of ``bn`` applied to the weight and bias of the conv before it."""

    bn: _BatchNorm

    def active(self) -> bool:
        return frozen_statistics(self.bn)

    def map(self, weight: torch.Tensor, bias: torch.Tensor | None) -> WeightBias:
        """``(weight * s, (bias - mu) * s + beta)``, ``s = gamma / sqrt(var + eps)``."""
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = (-bn.running_mean if bias is None else bias - bn.running_mean) * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return weight * scale.view(-1, *(1,) * (weight.dim() - 1)), shift


# ----------------------------------------------------------------------------- the BN side


def _no_more(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    return x


def _drop_act(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    return bn.act(bn.drop(x))


def _after_norm(cls: type) -> Callable[[_BatchNorm, torch.Tensor], torch.Tensor] | None:
    """What a BN class computes after normalising (None: a class whose forward is not
    known, never folded). ``nn.BatchNorm2d``: nothing; timm's ``BatchNormAct2d``:
    its dropout, then its activation (``norm_act.py``: batch_norm, drop, act)."""
    if cls is nn.BatchNorm2d:
        return _no_more
    timm_norm = sys.modules.get("timm.layers.norm_act")  # a timm network imported it
    if timm_norm is not None and cls is getattr(timm_norm, "BatchNormAct2d", None):
        return _drop_act
    return None


class _FoldableNorm:
    """A BatchNorm that leaves its normalisation to the conv before it while folded
    (``bn_folded`` and running statistics in use), then applies what follows it."""

    bn_folded: bool = False
    after_norm: Callable[[_BatchNorm, torch.Tensor], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_folded and frozen_statistics(self):
            return self.after_norm(x)
        return super().forward(x)


_FOLDABLE: dict[type, type] = {}


def _make_foldable(bn: _BatchNorm) -> None:
    """Give ``bn`` the folded path in place (a subclass of its class: ``isinstance``, the
    state-dict keys and the unfolded forward stay)."""
    cls = type(bn)
    if issubclass(cls, _FoldableNorm):
        return
    if cls not in _FOLDABLE:
        _FOLDABLE[cls] = type(f"Foldable{cls.__name__}", (_FoldableNorm, cls),
                              {"__module__": __name__, "after_norm": _after_norm(cls),
                               "__qualname__": f"Foldable{cls.__name__}"})
    bn.__class__ = _FOLDABLE[cls]


def _norm_class(bn: nn.Module) -> type:
    cls = type(bn)
    return cls.__mro__[2] if issubclass(cls, _FoldableNorm) else cls


# ----------------------------------------------------------------------------- the conv side


def _linear_conv(conv: nn.Module) -> bool:
    """Convs whose forward is ``conv2d(x, weight, bias)`` (after padding), so the BN's map
    can go into the weight and bias: ``nn.Conv2d``, :class:`SSConv2d`, timm's TF-"same"
    ``Conv2dSame``, with attached SS or not. Not e.g. weight-standardised convs."""
    if isinstance(conv, SSConv2d):
        return True
    if not isinstance(conv, nn.Conv2d):
        return False
    plain = next(c for c in type(conv).__mro__ if not issubclass(c, ScaleShift))
    known = {nn.Conv2d.forward}
    timm_conv = sys.modules.get("timm.layers.conv2d_same")
    if timm_conv is not None:
        known.add(timm_conv.Conv2dSame.forward)
    return plain.forward in known


# ----------------------------------------------------------------------------- the graph


class _LayerTracer(fx.Tracer):
    """Traces a network down to its convs and norms (and torch's own layers)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, _BatchNorm)) or super().is_leaf_module(m, qualname)


def _graph(backbone: nn.Module) -> fx.Graph | None:
    """The network's graph in eval mode (the mode folding applies in), or None where
    ``torch.fx`` cannot trace it (data-dependent control flow)."""
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        return _LayerTracer().trace(backbone)
    except Exception as exc:  # any tracing failure only means: leave the network unfolded
        log.info("BatchNorm folding: %s cannot be traced (%s: %s); left unfolded",
                 type(backbone).__name__, type(exc).__name__, str(exc).splitlines()[0][:120])
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode


def conv_bn_pairs(backbone: nn.Module) -> list[tuple[nn.Conv2d, _BatchNorm]]:
    """Every (conv, BatchNorm) of ``backbone`` where the conv's output goes to the BN and
    nowhere else, each called once per forward, both of classes whose forward is known
    (:func:`_linear_conv`, :func:`_after_norm`); found on its ``torch.fx`` graph."""
    graph = _graph(backbone)
    if graph is None:
        return []
    modules = dict(backbone.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv, bn = modules[source.target], modules[node.target]
        if (len(source.users) == 1 and calls[source.target] == calls[node.target] == 1
                and _linear_conv(conv) and _after_norm(_norm_class(bn)) is not None
                and conv.out_channels == bn.num_features):
            pairs.append((conv, bn))
    return pairs


_PAIRS: weakref.WeakKeyDictionary[nn.Module, list[Pair]] = weakref.WeakKeyDictionary()


def foldable_pairs(backbone: nn.Module) -> list[Pair]:
    """:func:`conv_bn_pairs`, made foldable in place (the convs SS-capable, the norms
    :class:`_FoldableNorm`) and kept for the network's lifetime: found once per network."""
    if backbone not in _PAIRS:
        pairs = []
        for conv, bn in conv_bn_pairs(backbone):
            layer = conv if isinstance(conv, ScaleShift) else next(make_ss_capable(conv))
            _make_foldable(bn)
            pairs.append((layer, bn))
        _PAIRS[backbone] = pairs
        log.debug("BatchNorm folding: %d conv+BN pairs in %s", len(pairs),
                  type(backbone).__name__)
    return _PAIRS[backbone]


@contextmanager
def folded_bn(backbone: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, each BN of :func:`foldable_pairs` that uses its running statistics
    is computed inside its conv; yields the number of pairs folded.

    Only when the whole network is in eval mode (the mode its graph was proven in);
    otherwise, or with ``enabled`` false, the block runs the network as it is.
    """
    on = enabled and not any(m.training for m in backbone.modules())
    pairs = foldable_pairs(backbone) if on else []
    for conv, bn in pairs:
        conv.bn_fold = BNFold(bn)
        bn.bn_folded = True
    try:
        yield len(pairs)
    finally:
        for conv, bn in pairs:
            conv.bn_fold = None
            bn.bn_folded = False
