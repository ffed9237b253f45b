"""From uint8 index batches to normalised float tensors, augmentation on whole batches.

Images stay uint8 until they are on the target device; conversion, augmentation and
normalisation then run as batched tensor ops (torchvision transforms v2), on the GPU
when there is one, so the data pipeline never holds the training loop back.
"""

from __future__ import annotations

import numpy as np
import torch

from ..versions import torchvision_module
from .base import ImageSplit

v2 = torchvision_module("torchvision.transforms.v2")  # a torch/torchvision mismatch: one line


def gather_uint8(split: ImageSplit, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(n, c, h, w)`` uint8 on ``device``, through pinned memory when it is CUDA."""
    return to_device(split.images[indices], device).permute(0, 3, 1, 2).contiguous()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host sync: pinned and non-blocking on CUDA.

    ``torch.as_tensor(array, device="cuda")`` copies from pageable memory and waits for
    the copy; in a training step that is a host<->device synchronisation every step.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class Normalizer:
    """uint8 ``(n, c, h, w)`` -> float, scaled to [0, 1] and standardised per channel.

    The last step before the backbone, so it also sets the memory format the backbone
    runs in (``channels_last``), in one place for every phase.
    """

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mul_(1.0 / 255.0)
        return x.sub_(self.mean).mul_(self.inv_std).contiguous(memory_format=self.memory_format)


def augmentation(kind: str, image_size: tuple[int, int], channels: int) -> v2.Transform | None:
    """Pre-training augmentation on uint8 batches (``none``, ``standard`` or ``strokes``).

    ``standard`` is the usual few-shot recipe: random crop with padding, horizontal flip
    for natural images, and brightness/contrast jitter. ``strokes`` is for drawings fed to
    a colour network (Omniglot through an ImageNet import): crop and a small affine only.
    Applied per batch: every image of a batch shares the random parameters of v2's batched
    call, so we apply it to small chunks to keep variety without a per-image Python loop.
    """
    if kind == "none":
        return None
    if kind not in ("standard", "strokes"):
        raise ValueError(f"unknown augmentation '{kind}' (none | standard | strokes)")
    h, w = image_size
    pad = max(2, h // 10)
    steps: list[v2.Transform] = [v2.RandomCrop((h, w), padding=pad, padding_mode="reflect")]
    if kind == "strokes":  # drawings in any colour mode: a mirror or a hue is another symbol
        steps.append(v2.RandomAffine(degrees=10, scale=(0.9, 1.1)))
    elif channels == 3:
        steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    else:
        steps.append(v2.RandomAffine(degrees=10, scale=(0.9, 1.1)))
    return v2.Compose(steps)


def augment_batch(images: torch.Tensor, transform: v2.Transform | None,
                  chunk: int = 4) -> torch.Tensor:
    """Apply ``transform`` to ``images`` in chunks of ``chunk`` (shared params per chunk)."""
    if transform is None:
        return images
    return torch.cat([transform(part) for part in images.split(chunk)])
