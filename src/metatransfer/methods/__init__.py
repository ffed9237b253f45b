"""Few-shot methods: one small class per method on one base, and one registry.

``base.py`` is the interface (:class:`FewShotMethod`: fit on a batch of episodes' support
features, then give their query logits), ``registry.py`` the names. Each built-in is one
file: ``mtl.py`` (inner loop from the meta-learned θ_0 on SS features), ``ft.py`` (the
same inner loop from zero on pre-trained features), ``protonet.py`` (nearest centroid),
``ft_all.py`` (the whole backbone fine-tuned per episode). ``catalog.py`` imports them and
builds a method from its name; a new method is one more file with ``@register_method``.

This package's own import is light (no torch), so the config and the CLI can use the
registry; the methods themselves are loaded by :mod:`metatransfer.methods.catalog`.
"""

from .base import META, PRETRAINED, FewShotMethod
from .registry import check_methods, comparison_pairs, method_names, register_method

__all__ = ["META", "PRETRAINED", "FewShotMethod", "check_methods", "comparison_pairs",
           "method_names", "register_method"]
