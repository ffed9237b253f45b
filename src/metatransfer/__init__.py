"""metatransfer: Meta-Transfer Learning (Sun et al., CVPR 2019 / TPAMI 2020) in PyTorch."""

__version__ = "0.1.0"

__all__ = ["FewShotClassifier", "__version__"]


def __getattr__(name: str):
    # imported lazily so `import metatransfer` stays cheap for the CLI
    if name == "FewShotClassifier":
        from .adapt import FewShotClassifier

        return FewShotClassifier
    raise AttributeError(f"module 'metatransfer' has no attribute {name!r}")
