"""``mtl export``: a checkpoint as an ONNX model any runtime can serve.

Without a support folder it is the embedding network of the checkpoint's default method
(SS folded into the weights, :mod:`.fold`); with one it is a fixed-class classifier: that
network and the head ``mtl adapt`` fits on the support images, the class names in the
model's metadata. Beside the model goes a JSON of the preprocessing the network was
trained with (size, resize, colour, polarity, statistics), which
``examples/onnx_predict.py`` applies with Pillow and numpy. Every input is checked (the
checkpoint, every support image decoded, the packages) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import MTLError

log = logging.getLogger(__name__)

FORMAT = "metatransfer-onnx/1"  # the JSON's "format": bump when its keys change


def preprocessing_json(prep, output: str, classes: list[str] | None) -> dict:
    """What an image goes through before the exported network, in plain terms."""
    from ..preprocessing import resize_steps

    shorter, interpolation = resize_steps(prep.resize)
    doc = {"format": FORMAT, "input": "image", "output": output, "layout": "NCHW float32",
           "size": int(prep.image_size), "resize": "crop" if shorter else "direct",
           "shorter_side": int(shorter), "interpolation": interpolation,
           "colour": "RGB" if prep.channels == 3 else "L", "invert": bool(prep.invert),
           "mean": [float(v) for v in prep.mean], "std": [float(v) for v in prep.std]}
    if classes is not None:
        doc["classes"] = list(classes)
    return doc


def export(checkpoint: str | Path, out: str | Path, support: str | Path | None = None,
           method: str | None = None) -> dict:
    """Write ``out`` (.onnx) and its preprocessing JSON; returns the JSON's contents."""
    from ..adapt import FewShotClassifier, scan_support
    from .model import Classifier, Embedding, fitted_head
    from .onnx_file import require_onnx, write_onnx

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise MTLError(f"--out {out}: name the model file *.onnx (its preprocessing goes "
                       "beside it as .json)")
    require_onnx()
    folders = scan_support(support) if support is not None else None
    clf = FewShotClassifier.from_checkpoint(checkpoint, method, "cpu", amp="off")
    embedding = Embedding(clf.model.backbone, clf.preprocessing.feature_norm)
    if folders is None:
        module, output, classes = embedding, "embedding", None
        probe = torch.randn(2, clf.model.channels, clf.image_size, clf.image_size)
    else:
        clf.fit(folders)  # decodes every support image: a broken one is the one message
        module = Classifier(embedding, fitted_head(clf.method, clf.learner))
        output, classes = "probabilities", clf.classes_
        probe = standardised(clf, clf.preprocess([p for ps in folders.values() for p in ps]))
    doc = preprocessing_json(clf.preprocessing, output, classes)
    metadata = {"kind": "classifier" if classes else "embedding", "method": clf.method,
                "classes": json.dumps(classes), "preprocessing": json.dumps(doc),
                "checkpoint": str(checkpoint), "metatransfer": __version__}
    write_onnx(module, probe, out, output, metadata, doc)
    return doc


def standardised(clf, rows) -> torch.Tensor:
    """``(n, size, size, c)`` uint8 rows as the network's float input (its statistics)."""
    x = torch.from_numpy(rows).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(clf.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(clf.preprocessing.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def cmd_export(args: argparse.Namespace) -> None:
    doc = export(args.checkpoint, args.out, args.support, args.method)
    what = (f"a {len(doc['classes'])}-class classifier ({', '.join(doc['classes'])})"
            if "classes" in doc else "the embedding network")
    print(f"wrote {args.out}: {what}, {doc['size']}x{doc['size']} {doc['colour']} input; "
          f"preprocessing in {Path(args.out).with_suffix('.json')}", file=sys.stderr)
