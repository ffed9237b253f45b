"""Few-shot classification of the user's own images: the Python API and ``mtl adapt``.

A :class:`FewShotClassifier` wraps a loaded model (:mod:`metatransfer.loader`) and one
evaluation method (``mtl``, ``ft``, ``protonet`` or another that embeds once, the very
classes meta-test runs, :mod:`metatransfer.methods`): ``fit`` embeds a handful of labelled
images per class and runs the base learner on them, ``predict`` classifies new images.
Images go through the training preprocessing (decode, resize, normalise), and the
embedding and base-learner code are the ones meta-test uses, so adapting on an
episode's support images reproduces its meta-test accuracy.

    clf = FewShotClassifier.from_checkpoint("runs/x")
    clf.fit({"cat": ["c1.jpg", "c2.jpg"], "dog": [pil_image, uint8_array]})
    clf.predict(["q.jpg"])          # -> ["cat"]
    clf.predict_proba(["q.jpg"])    # -> (1, 2) probabilities, columns in clf.classes_
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .amp_choice import choose_amp
from .checkpoints import ModelInfo
from .config import EvalConfig
from .data.base import ImageSplit
from .data.images import IMAGE_EXTENSIONS, CorruptImageError, decode_file, is_image_file
from .devices import resolve_device
from .embedding import embed_one_call, uses_batch_stats
from .errors import DataError, MTLError
from .loader import LoadedModel, available_methods, find_checkpoints, load_models
from .methods.base import PRETRAINED
from .methods.catalog import create_method, method_class
from .methods.registry import EMBED_ONCE_METHODS
from .preprocessing import Decoding, Preprocessing, polarity_warning

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor

_KINDS = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
LAYOUTS = ("accepted: a path, a PIL image, a uint8 numpy array (h, w) or (h, w, c), or a "
           "tensor (c, h, w) or (h, w), uint8 or float in [0, 1]; c is 1, 3 or 4")


# ----------------------------------------------------------------------------- images


def _from_pil(image: Image.Image, steps: Decoding) -> np.ndarray:
    """An already-decoded image as a row: the same steps as
    :func:`metatransfer.data.images.decode_file` applies after decoding a file (a test
    checks the two agree)."""
    return steps.decode(image)


def _from_array(array: np.ndarray, steps: Decoding, what: str) -> np.ndarray:
    """``(h, w)`` or ``(h, w, c)`` uint8 with c in 1, 3, 4 -> ``(size, size, channels)``."""
    if array.dtype != np.uint8:
        raise DataError(f"{what}: arrays must be uint8 (h, w, c), got {array.dtype}; "
                        "pass a uint8 array or a float tensor in [0, 1]")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        hint = ("; it looks like (c, h, w): use array.transpose(1, 2, 0)"
                if array.ndim == 3 and array.shape[0] in (1, 3, 4) else "")
        raise DataError(f"{what}: a numpy array of shape {tuple(array.shape)} is not an "
                        f"image{hint} ({LAYOUTS})")
    return np.ascontiguousarray(steps.decode_array(array))


def _from_tensor(tensor: torch.Tensor, steps: Decoding, what: str) -> np.ndarray:
    """A ``(c, h, w)`` or ``(h, w)`` tensor, uint8 or float in [0, 1] (torchvision's layout)."""
    t = tensor.detach().cpu()
    if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] not in (1, 3, 4)):
        hint = ("; it looks like (h, w, c): use tensor.permute(2, 0, 1)"
                if t.dim() == 3 and t.shape[2] in (1, 3, 4) else "")
        raise DataError(f"{what}: a tensor of shape {tuple(t.shape)} is not an image{hint} "
                        f"({LAYOUTS})")
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise DataError(f"{what}: tensors must be uint8 or float in [0, 1], got {t.dtype}")
    if t.dim() == 3:
        t = t.permute(1, 2, 0)
    return _from_array(t.numpy(), steps, what)


def _read_path(path: Path, steps: Decoding) -> np.ndarray:
    """A file through the dataset loaders' decoder, with errors that fit this command."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass image files (or a folder only as --query)")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not is_image_file(path):
        raise DataError(f"{path} is not an image file (expected {_KINDS}); remove it or "
                        "pass only images")
    try:
        return decode_file(path, steps)
    except CorruptImageError as exc:
        cause = str(exc).split("; ")[0]
        raise DataError(f"{cause}; replace or remove the file") from None


def load_image(image: ImageLike, steps: Decoding, what: str = "image") -> np.ndarray:
    """Any accepted image as a ``(size, size, channels)`` uint8 row, decoded with the
    checkpoint's ``steps`` (colour mode, size, resize policy, ink polarity: see
    :class:`metatransfer.preprocessing.Decoding`), exactly as its training files were."""
    if isinstance(image, (str, Path)):
        return _read_path(Path(image), steps)
    if isinstance(image, Image.Image):
        return _from_pil(image, steps)
    if isinstance(image, np.ndarray):
        return _from_array(image, steps, what)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, steps, what)
    raise DataError(f"{what}: unsupported type {type(image).__name__} ({LAYOUTS})")


def _as_list(images) -> list:
    """A single image, a sequence of images or a batch array/tensor -> a list of images."""
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images]
    return list(images)


# ----------------------------------------------------------------------------- classifier


def _resolve_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _classifier_method(name: str) -> type:
    """The class of method ``name``, which must embed once (a fitted support set)."""
    cls = method_class(name)  # unknown names: a one-line error listing the methods
    if not cls.embeds_once:
        raise MTLError(f"method '{name}' fine-tunes the backbone per episode; a classifier "
                       f"uses one that embeds once ({', '.join(EMBED_ONCE_METHODS)})")
    return cls


class FewShotClassifier:
    """A few-shot classifier: a frozen backbone plus a base learner fitted on support images.

    Args:
        model: the network (:func:`metatransfer.loader.load_models`): backbone, θ_0 and
            the preprocessing every image goes through.
        method: ``mtl`` (inner loop from θ_0), ``ft`` (inner loop from zero),
            ``protonet`` (nearest centroid) or another registered method that embeds once.
        inner_steps, inner_lr: base-learner settings (default: the checkpoint's).
        amp: bf16 autocast of the backbone: ``auto`` (where the device has bf16 natively,
            as training and meta-test do), ``bf16`` or ``off``.
    """

    def __init__(self, model: LoadedModel, method: str, device: str | torch.device = "auto",
                 inner_steps: int | None = None, inner_lr: float | None = None,
                 amp: str = "auto") -> None:
        if _classifier_method(method).needs_head and model.head is None:
            raise MTLError(f"method '{method}' needs a meta-trained checkpoint (with theta_0); "
                           "use --method protonet or ft with a pre-trained one")
        self.device = _resolve_device(device)
        self.model, self.info, self.method = model, model.info, method
        # the checkpoint's evaluation inner loop: ft's own when meta-test tuned it apart
        own = "ft_" if method == "ft" else ""
        info = model.info
        default_steps = info.extra.get(f"{own}inner_steps", info.inner_steps)
        default_lr = info.extra.get(f"{own}inner_lr", info.inner_lr)
        self.inner_steps = int(default_steps) if inner_steps is None else int(inner_steps)
        self.inner_lr = float(default_lr) if inner_lr is None else float(inner_lr)
        # channels_last as runs default to, so the embeddings are meta-test's
        choice = choose_amp(amp, self.device, info.backbone, info.backbone_args,
                            info.in_channels, info.image_size)
        log.info("precision %s", choice.reason)
        self.embedder = model.embedder(self.device, amp=choice.amp == "bf16",
                                       channels_last=True)
        settings = EvalConfig(inner_steps=self.inner_steps, inner_lr=self.inner_lr)
        self.learner = create_method(method, settings, model.head)
        # batch-statistics BN (the authors' TensorFlow model): one call, one BN batch
        self._one_call = uses_batch_stats(self.embedder.backbone)
        self.classes_: list[str] = []
        self.warnings: list[str] = []  # of the last fit: images unlike the training data
        self._labels: torch.Tensor | None = None

    # -- construction

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, method: str | None = None,
                        device: str | torch.device = "auto", inner_steps: int | None = None,
                        inner_lr: float | None = None, amp: str = "auto") -> FewShotClassifier:
        """Load a run directory (meta_best, else pretrain_best) or a checkpoint file."""
        return load_classifiers(checkpoint, [method] if method else None, device,
                                inner_steps, inner_lr, amp)[0]

    # -- images

    @property
    def preprocessing(self) -> Preprocessing:
        """What every image goes through (the checkpoint's)."""
        return self.model.preprocessing

    @property
    def image_size(self) -> int:
        return int(self.preprocessing.image_size)

    @property
    def decoding(self) -> Decoding:
        """What the training data's loader did to every image (see :func:`load_image`)."""
        return self.preprocessing.decoding

    def preprocess(self, images: Iterable[ImageLike], what: str = "image") -> np.ndarray:
        """``(n, size, size, channels)`` uint8, exactly as the training data was prepared.

        Arrays, tensors and PIL images are images as stored, like files: they get every
        step of :attr:`decoding`, the ink inversion of an Omniglot model included (rows
        of a split its loader already inverted are not raw images)."""
        steps = self.decoding
        items = _as_list(images)
        if not items:
            return np.zeros((0, steps.size, steps.size, steps.channels), np.uint8)
        return np.stack([load_image(im, steps, f"{what} {i + 1}")
                         for i, im in enumerate(items)])

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """``(n, D)`` embeddings of preprocessed uint8 images, through meta-test's embedder."""
        prep = self.preprocessing
        split = ImageSplit(images, np.zeros(len(images), np.int64), ["_"], "adapt",
                           tuple(prep.mean), tuple(prep.std))
        indices = np.arange(len(images))
        if self._one_call:
            return embed_one_call(self.embedder, split, indices)
        return self.embedder.embed(split, indices)

    # -- fit / predict

    def fit(self, support: Mapping[str, Sequence[ImageLike]]) -> FewShotClassifier:
        """Adapt to ``{class name: images}`` (>= 2 classes, >= 1 image each, any counts).

        Classes keep the mapping's order (``classes_``). Unequal shots are one task with
        all support images; the inner loop averages the loss over images and ProtoNet
        divides by each class's own count.
        """
        if not isinstance(support, Mapping):
            raise DataError("support must map class names to lists of images")
        names = [str(n) for n in support]
        if len(names) < 2:
            raise DataError(f"support has {len(names)} class{'es' if len(names) != 1 else ''}; "
                            "few-shot classification needs at least 2 classes")
        if len(set(names)) != len(names):
            raise DataError("support has duplicate class names; give each class its own name")
        arrays, labels = [], []
        for label, (name, images) in enumerate(support.items()):
            batch = self.preprocess(images, what=f"class '{name}' image")
            if len(batch) == 0:
                raise DataError(f"class '{name}' has no support images; add at least one or "
                                "remove the class")
            arrays.append(batch)
            labels += [label] * len(batch)
        rows = np.concatenate(arrays)
        self.warnings = self._check_polarity(rows)
        feats = self.embed(rows)[None]
        self._labels = torch.as_tensor(labels, device=self.device)[None]
        self.classes_ = names
        with torch.no_grad():
            self.learner.fit(feats, self._labels, len(names))
        return self

    def _check_polarity(self, support: np.ndarray) -> list[str]:
        """A one-line warning (logged, and returned for ``serve``) when the support images
        look inverted against the training images (see
        :func:`metatransfer.preprocessing.polarity_warning`)."""
        warning = polarity_warning(support, self.info.mean, self.decoding.invert)
        if warning:
            log.warning(warning)
        return [warning] if warning else []

    def shots(self) -> dict[str, int]:
        """Support images per class of the last ``fit``."""
        if self._labels is None:
            return {}
        counts = torch.bincount(self._labels[0], minlength=len(self.classes_)).tolist()
        return dict(zip(self.classes_, counts, strict=True))

    def logits(self, images) -> torch.Tensor:
        """``(n, ways)`` query logits (float32, on the classifier's device)."""
        if self._labels is None:
            raise MTLError("call fit(support) before predicting")
        batch = self.preprocess(images, what="query image")
        if len(batch) == 0:
            return torch.zeros(0, len(self.classes_), device=self.device)
        query = self.embed(batch)[None]
        with torch.no_grad():
            logits = self.learner.logits(query)
        return logits[0]

    def predict_proba(self, images) -> np.ndarray:
        """``(n, ways)`` class probabilities (softmax of the logits); columns = ``classes_``."""
        return torch.softmax(self.logits(images), dim=-1).cpu().numpy()

    def predict(self, images) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes_[i] for i in self.logits(images).argmax(-1).tolist()]


def load_classifiers(checkpoint: str | Path, methods: list[str] | None = None,
                     device: str | torch.device = "auto", inner_steps: int | None = None,
                     inner_lr: float | None = None, amp: str = "auto") -> list[FewShotClassifier]:
    """Classifiers for ``methods`` (default: the checkpoint's default), sharing backbones."""
    paths = find_checkpoints(checkpoint)
    usable = available_methods(paths)
    methods = methods or usable[:1] or ["protonet"]
    for method in methods:
        if _classifier_method(method).model == PRETRAINED and method not in usable:
            raise MTLError(f"method '{method}' needs pre-trained features: pass the run "
                           "directory (with pretrain_best.safetensors) or that file")
    models = load_models(paths, methods)
    dev = _resolve_device(device)
    return [FewShotClassifier(models[m], m, dev, inner_steps, inner_lr, amp) for m in methods]


def domain_warning(info: ModelInfo, paths: Iterable[Path], sample: int = 8) -> str | None:
    """A warning when the images are clearly unlike the model's training images: colour
    photos for a grayscale model, or photos many times larger than its input size.

    Only file headers of the first ``sample`` images are read."""
    colour, largest = 0, 0
    for path in list(paths)[:sample]:
        try:
            with Image.open(path) as im:
                colour += im.mode not in ("1", "L", "LA", "I", "I;16", "F")
                largest = max(largest, min(im.size))
        except (OSError, ValueError):
            continue  # unreadable files are reported when they are decoded
    size, trained = int(info.image_size), f" ({info.source})" if info.source else ""
    problems = []
    if colour and int(info.in_channels) == 1:
        problems.append("converted to grayscale")
    if largest >= 4 * size and size < 64:
        problems.append(f"shrunk from about {largest} px to {size}×{size}")
    if not problems:
        return None
    return (f"the model was trained on {'grayscale' if info.in_channels == 1 else 'colour'} "
            f"{size}×{size} images{trained}; your images are {' and '.join(problems)}, so "
            "expect poor accuracy: use a checkpoint trained on images like yours")


# ----------------------------------------------------------------------------- folders


def scan_support(folder: str | Path) -> dict[str, list[Path]]:
    """``{class: image paths}`` of a folder with one sub-folder per class (sorted names)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"support folder {root} does not exist or is not a folder")
    classes: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry} lies directly in the support folder; put each class's "
                            "images in a sub-folder named after the class")
        classes[entry.name] = _image_files(entry, f"class folder {entry}")
    if len(classes) < 2:
        raise DataError(f"support folder {root} has {len(classes)} class folder"
                        f"{'s' if len(classes) != 1 else ''}; few-shot classification needs "
                        "at least 2 (one sub-folder of images per class)")
    return classes


def _image_files(folder: Path, what: str) -> list[Path]:
    files = []
    for item in sorted(folder.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            raise DataError(f"{item} is a folder inside {what}; only image files belong there")
        if not is_image_file(item):
            raise DataError(f"{item} is not an image file (expected {_KINDS}); remove it")
        files.append(item)
    if not files:
        raise DataError(f"{what} is empty; add at least one image ({_KINDS})")
    return files


def expand_queries(paths: Sequence[str | Path]) -> list[Path]:
    """Query files in order; a folder contributes its images (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += _image_files(p, f"query folder {p}")
        elif not p.exists():
            raise DataError(f"query {p} does not exist")
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- CLI


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the ``k`` most probable ``(class, probability)`` pairs, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx]
            for row, idx in zip(probs, order, strict=True)]


def format_table(queries: list[str], ranked: list[list[tuple[str, float]]]) -> str:
    width = max([len("query")] + [len(q) for q in queries])
    k = len(ranked[0]) if ranked else 1
    head = f"{'query':<{width}}  prediction"
    if k > 1:
        head += "  (top " + str(k) + ")"
    lines = [head]
    for q, row in zip(queries, ranked, strict=True):
        cells = "   ".join(f"{c} {p:.3f}" for c, p in row)
        lines.append(f"{q:<{width}}  {cells}")
    return "\n".join(lines)


def write_output(path: Path, queries: list[str], ranked, method: str, classes: list[str]):
    if path.suffix.lower() == ".json":
        doc = {"method": method, "classes": classes,
               "predictions": [{"query": q, "prediction": r[0][0], "probability": r[0][1],
                                "top": [{"class": c, "probability": p} for c, p in r]}
                               for q, r in zip(queries, ranked, strict=True)]}
        path.write_text(json.dumps(doc, indent=2))
    elif path.suffix.lower() == ".csv":
        k = len(ranked[0]) if ranked else 1
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            header = ["query"]
            for i in range(1, k + 1):
                header += [f"class_{i}", f"probability_{i}"]
            writer.writerow(header)
            for q, row in zip(queries, ranked, strict=True):
                writer.writerow([q] + [v for c, p in row for v in (c, f"{p:.6f}")])
    else:
        raise DataError(f"--output {path}: use a .csv or .json file name")


def cmd_adapt(args: argparse.Namespace) -> None:
    support = scan_support(args.support)
    queries = expand_queries(args.query)
    if args.top < 1:
        raise MTLError("--top must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, args.method, args.device,
                                            args.inner_steps, args.inner_lr, args.amp)
    clf.fit(support)  # decodes every support image first: a broken file is the one message
    warning = domain_warning(clf.info, [p for paths in support.values() for p in paths])
    if warning:
        log.warning(warning)
    probs = clf.predict_proba(queries)
    names = [str(q) for q in queries]
    ranked = top_k(probs, clf.classes_, min(args.top, len(clf.classes_)))
    shots = clf.shots()
    print(f"method {clf.method}, {len(shots)} classes "
          f"({', '.join(f'{c}: {n}' for c, n in shots.items())} support images), "
          f"device {clf.device}", file=sys.stderr)
    if args.output:
        write_output(Path(args.output), names, ranked, clf.method, clf.classes_)
        print(f"wrote {len(names)} predictions to {args.output}", file=sys.stderr)
    else:
        print(format_table(names, ranked))
