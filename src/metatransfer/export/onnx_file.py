"""Writing an exported network as ONNX, checked against PyTorch before it is kept.

The graph is traced by ``torch.onnx.export`` (the ``torch.export`` path, which needs
``onnxscript``) with a dynamic batch dimension, given its metadata (class names, method,
preprocessing), then run with onnxruntime on probe images and compared with the PyTorch
module it came from. Only a model that agrees is moved into place, with its
preprocessing JSON beside it: a failed export leaves no file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MTLError

log = logging.getLogger(__name__)

INPUT = "image"
CHATTY = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")  # quietened while tracing
TOLERANCE = 1e-4  # largest |ONNX - PyTorch| allowed, relative to the output's scale


def require_onnx():
    """``(onnx, onnxruntime)``, or one line naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's graph translator)
    except ImportError as exc:
        raise MTLError(f"`mtl export` needs onnx, onnxscript and onnxruntime ({exc.name} is "
                       "missing): pip install -e '.[export]'") from None
    return onnx, onnxruntime


def _trace(module: nn.Module, probe: torch.Tensor, path: Path, output: str) -> None:
    """``module`` as ONNX at ``path``, batch size dynamic; the exporter's own progress
    lines and warnings go to the debug log, not the user's terminal."""
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), _quiet(*CHATTY):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (probe,), str(path), input_names=[INPUT],
                          output_names=[output], dynamic_shapes=({0: batch},), dynamo=True,
                          verbose=False)
    log.debug("torch.onnx.export: %s", chatter.getvalue().strip())


@contextlib.contextmanager
def _quiet(*names: str):
    """Loggers ``names`` at WARNING for the block (the exporter's passes log every step)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check(session, module: nn.Module, probe: torch.Tensor) -> float:
    """Largest difference of the ONNX model's output from the module's on ``probe``,
    relative to the output's scale."""
    got = session.run(None, {INPUT: probe.numpy()})[0]
    with torch.no_grad():
        want = module(probe).numpy()
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def write_onnx(module: nn.Module, probe: torch.Tensor, out: Path, output: str,
               metadata: dict[str, str], preprocessing: dict) -> None:
    """Write ``module`` to ``out`` (``.onnx``) and ``preprocessing`` to ``out`` with the
    suffix ``.json``; ``probe``: standardised images it is traced and checked on."""
    onnx, ort = require_onnx()
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        model_tmp, json_tmp = Path(tmp) / out.name, Path(tmp) / "preprocessing.json"
        try:
            _trace(module, probe, model_tmp, output)
        except Exception as exc:  # the exporter's many failure types mean one thing here
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise MTLError(f"this network cannot be exported to ONNX ({reason})") from None
        model = onnx.load(str(model_tmp))
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, str(model_tmp))
        session = ort.InferenceSession(str(model_tmp), providers=["CPUExecutionProvider"])
        error = _check(session, module, probe)
        if error > TOLERANCE:
            raise MTLError(f"the ONNX model differs from the PyTorch network by {error:.2e} "
                           f"(more than {TOLERANCE:g}); nothing was written")
        log.info("ONNX model checked against PyTorch on %d images: largest difference %.1e",
                 len(probe), error)
        json_tmp.write_text(json.dumps(preprocessing, indent=2) + "\n")
        os.replace(json_tmp, out.with_suffix(".json"))
        os.replace(model_tmp, out)
