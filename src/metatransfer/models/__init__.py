"""Backbones with scaling-and-shifting convolutions."""

from . import resnets  # noqa: F401  (registers the ResNets)
from .backbones import backbone_names, create_backbone, place_backbone, register_backbone
from .ss import SSConv2d, enable_ss, ss_convs

__all__ = ["SSConv2d", "backbone_names", "create_backbone", "enable_ss", "place_backbone",
           "register_backbone", "ss_convs"]
