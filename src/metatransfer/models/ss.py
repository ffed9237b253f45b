"""Scaling and shifting (SS): the meta-transfer operation of Sun et al. (CVPR 2019).

``SS(X; W, b; Phi_S1, Phi_S2) = (W * Phi_S1) conv X + (b + Phi_S2)`` with W and b frozen.
Phi_S1 starts at 1 and Phi_S2 at 0, so an SS network at initialisation is exactly the
pre-trained one. SS parameters exist only after :func:`enable_ss`, so a plain backbone's
state dict has no SS keys; they sit beside each ``weight`` as ``ss_scale``/``ss_shift``.

Two kinds of module carry SS:

- :class:`SSConv2d`, the conv every built-in backbone is made of (one fused ``conv2d``);
- any other ``nn.Conv2d`` (subclasses such as timm's TF-"same" conv included, grouped and
  depthwise too) or ``nn.Linear`` of a network built elsewhere: :func:`make_ss_capable`
  gives it SS in place (its class becomes a subclass of its own class, so ``isinstance``,
  its forward and its state-dict keys stay). A conv's Phi_S1 is one scalar per kernel,
  ``(C_out, C_in / groups, 1, 1)`` (or per output channel); a ``Linear`` gets one scale
  and one shift per output feature, the SSF form (Lian et al., NeurIPS 2022).

A conv can also carry a folded BatchNorm (:mod:`.fold`): while ``bn_fold`` is set and
active, the layer computes conv + BN as one conv, its weight and bias mapped by the BN's
affine map after SS.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

import torch
from torch import nn

# kernel: one Phi_S1 per (out, in) kernel (the paper's); channel: one per output channel;
# mixed: per kernel on k x k convs, per channel on 1 x 1 - on a pointwise conv one scale per
# kernel is one per weight (full multiplicative fine-tuning), too much capacity for SS
Granularity = Literal["kernel", "channel", "mixed"]
GRANULARITIES = ("kernel", "channel", "mixed")

WeightBias = tuple[torch.Tensor, torch.Tensor | None]


class WeightBiasMap(Protocol):
    """What :mod:`.fold` sets as a layer's ``bn_fold``: ``active()`` says whether it
    applies to this call, ``map(weight, bias)`` gives the weight and bias to use instead."""

    def active(self) -> bool: ...

    def map(self, weight: torch.Tensor, bias: torch.Tensor | None) -> WeightBias: ...


class ScaleShift:
    """What every SS-capable layer has: ``ss_scale`` (Phi_S1), ``ss_shift`` (Phi_S2)."""

    ss_scale: nn.Parameter | None
    ss_shift: nn.Parameter | None
    weight: nn.Parameter
    bias: nn.Parameter | None
    #: a BatchNorm folded into this layer (set by :func:`.fold.folded_bn`, never saved:
    #: not a module, so not in the state dict)
    bn_fold: WeightBiasMap | None = None

    @property
    def ss_enabled(self) -> bool:
        return self.ss_scale is not None

    def folding(self) -> bool:
        """Whether this call computes the layer and the BatchNorm after it as one op."""
        return self.bn_fold is not None and self.bn_fold.active()

    def ss_weight_bias(self) -> WeightBias:
        """``W * Phi_S1`` and ``b + Phi_S2`` (``W`` and ``b`` themselves without SS)."""
        if self.ss_scale is None:
            return self.weight, self.bias
        bias = self.ss_shift if self.bias is None else self.bias + self.ss_shift
        return self.weight * self.ss_scale, bias

    def folded_weight_bias(self) -> WeightBias:
        """The weight and bias of SS then the folded BN (call only while :meth:`folding`)."""
        return self.bn_fold.map(*self.ss_weight_bias())

    def ss_scale_shape(self, granularity: Granularity) -> tuple[int, ...]:
        """Phi_S1's shape: per kernel ``(out, in/groups, 1, 1)`` or per channel
        ``(out, 1, 1, 1)`` for a conv (``mixed``: per channel where the kernel is 1 x 1);
        ``(out, 1)`` for a linear layer (any granularity)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"SS granularity must be one of {', '.join(GRANULARITIES)}, got "
                             f"{granularity}")
        out_ch, in_ch = self.weight.shape[:2]
        if self.weight.dim() == 2:
            return (out_ch, 1)
        rest = (1,) * (self.weight.dim() - 2)
        pointwise = all(k == 1 for k in self.weight.shape[2:])
        per_kernel = granularity == "kernel" or (granularity == "mixed" and not pointwise)
        return (out_ch, in_ch if per_kernel else 1, *rest)

    def enable_ss(self, granularity: Granularity = "kernel") -> list[nn.Parameter]:
        """Add Phi_S1 = 1 and Phi_S2 = 0 ``(out,)``; freeze W and b. Returns the new
        parameters."""
        shape = self.ss_scale_shape(granularity)
        device, dtype = self.weight.device, self.weight.dtype
        self.ss_scale = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.ss_shift = nn.Parameter(torch.zeros(shape[0], device=device, dtype=dtype))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return [self.ss_scale, self.ss_shift]


class SSConv2d(ScaleShift, nn.Conv2d):
    """A ``Conv2d`` that can be scaled and shifted by meta-learned parameters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ss_scale = None
        self.ss_shift = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folding():
            weight, bias = self.folded_weight_bias()
        elif self.ss_scale is None:
            return super().forward(x)
        else:
            weight, bias = self.ss_weight_bias()
        return self._conv_forward(x, weight, bias)


class _AttachedSS(ScaleShift):
    """SS attached to a layer of any class: its own forward runs with ``W * Phi_S1`` in
    place of ``W``, then Phi_S2 is added to every output channel / feature (the same as
    adding it to the bias)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.folding():  # SS and the BN in the weight and bias (only convs are folded)
            return self._forward_with(self.folded_weight_bias(), x, *args, **kwargs)
        if self.ss_scale is None:
            return super().forward(x, *args, **kwargs)
        frozen = self._parameters["weight"]
        out = self._forward_with((frozen * self.ss_scale, self.bias), x, *args, **kwargs)
        if frozen.dim() == 2:  # linear: (..., out)
            return out + self.ss_shift
        return out + self.ss_shift.view(-1, *(1,) * (frozen.dim() - 2))

    def _forward_with(self, weight_bias: WeightBias, x: torch.Tensor, *args,
                      **kwargs) -> torch.Tensor:
        """The layer's own forward with another weight and bias for this call (it reads
        ``self.weight`` and ``self.bias``)."""
        saved = self._parameters["weight"], self._parameters["bias"]
        self._parameters["weight"], self._parameters["bias"] = weight_bias
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._parameters["weight"], self._parameters["bias"] = saved


_ATTACHED: dict[type, type] = {}


def _attached_class(cls: type) -> type:
    if cls not in _ATTACHED:
        _ATTACHED[cls] = type(f"SS{cls.__name__}", (_AttachedSS, cls),
                              {"__module__": __name__, "__qualname__": f"SS{cls.__name__}"})
    return _ATTACHED[cls]


def ss_capable(module: nn.Module) -> bool:
    """Layers SS can be attached to: every conv (any ``nn.Conv2d``) and ``nn.Linear``."""
    return isinstance(module, (ScaleShift, nn.Conv2d, nn.Linear))


def make_ss_capable(module: nn.Module) -> Iterator[ScaleShift]:
    """Give every conv / linear layer in ``module`` (itself included) SS, in place, and
    yield them. Built-in :class:`SSConv2d` layers are left as they are."""
    for m in module.modules():
        if isinstance(m, ScaleShift):
            yield m
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            m.__class__ = _attached_class(type(m))
            m.ss_scale = None
            m.ss_shift = None
            yield m


def ss_modules(module: nn.Module) -> Iterator[ScaleShift]:
    """The SS-capable layers of ``module`` (after :func:`make_ss_capable` for networks
    not built from :class:`SSConv2d`)."""
    return (m for m in module.modules() if isinstance(m, ScaleShift))


ss_convs = ss_modules  # the name the built-in backbones' tests and tools use


def scope_targets(backbone: nn.Module, scope: str) -> list[nn.Module]:
    """The sub-modules SS covers: ``all`` (the whole backbone), ``last`` (its last stage,
    ``backbone.stages()[-1]``) or comma-separated glob patterns on module names as in
    ``backbone.named_modules()`` (e.g. ``model.blocks.5*,model.conv_head``)."""
    if scope == "all":
        return [backbone]
    if scope == "last":
        if not hasattr(backbone, "stages"):
            raise ValueError(f"{type(backbone).__name__} has no stages; use an SS scope of "
                             "'all' or a module-name pattern")
        return [backbone.stages()[-1]]
    patterns = [p.strip() for p in scope.split(",") if p.strip()]
    if not patterns:
        raise ValueError("SS scope must be 'all', 'last' or module-name patterns")
    named = list(backbone.named_modules())
    chosen = [m for name, m in named if name and any(fnmatch.fnmatchcase(name, p)
                                                     for p in patterns)]
    if not any(ss_capable(x) for m in chosen for x in m.modules()):
        examples = ", ".join(name for name, m in named if name and ss_capable(m))
        raise ValueError(f"SS scope '{scope}' matches no conv or linear layer; layer names "
                         f"look like: {examples[:300]}")
    return chosen


def enable_ss(
    backbone: nn.Module,
    granularity: Granularity = "kernel",
    scope: str = "all",
    bn_affine: bool = False,
) -> list[nn.Parameter]:
    """Freeze the whole backbone, then add SS to the conv (and linear) layers of ``scope``
    (see :func:`scope_targets`).

    Returns the meta-learnable parameters: the SS parameters, plus BN affine parameters of
    the same scope when ``bn_affine`` is set. Layers already carrying SS (restored from a
    checkpoint) keep their values.
    """
    for p in backbone.parameters():
        p.requires_grad_(False)
    targets: Iterable[nn.Module] = scope_targets(backbone, scope)
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for target in targets:
        for layer in make_ss_capable(target):
            if id(layer) in seen:  # nested patterns name a layer twice
                continue
            seen.add(id(layer))
            if layer.ss_enabled:
                layer.ss_scale.requires_grad_(True)
                layer.ss_shift.requires_grad_(True)
                params.extend([layer.ss_scale, layer.ss_shift])
            else:
                params.extend(layer.enable_ss(granularity))
        if bn_affine:
            for m in target.modules():
                if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                        and id(m) not in seen):
                    seen.add(id(m))
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)
                    params.extend([m.weight, m.bias])
    return params


def ss_state_keys(backbone: nn.Module) -> list[str]:
    """State-dict keys of the SS parameters (for checkpoints and import checks)."""
    return [k for k in backbone.state_dict() if k.endswith(("ss_scale", "ss_shift"))]


def restore_ss_layout(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Enable SS on exactly the layers whose SS tensors appear in ``state``, before loading.

    Lets a checkpoint rebuild its own SS layout (scope and granularity) without a config.
    """
    wanted = {k[: -len(".ss_scale")] for k in state if k.endswith(".ss_scale")}
    if not wanted:
        return
    for name, module in list(backbone.named_modules()):
        if name not in wanted:
            continue
        layer = next(make_ss_capable(module)) if not isinstance(module, ScaleShift) else module
        shape = state[f"{name}.ss_scale"].shape
        fan_in = layer.weight.shape[1]
        per_channel = layer.weight.dim() > 2 and shape[1] == 1 and fan_in > 1
        layer.enable_ss("channel" if per_channel else "kernel")
