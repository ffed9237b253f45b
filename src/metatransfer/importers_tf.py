"""Import the MTL authors' TensorFlow release (``mtl import authors-tf DIR_OR_FILES``).

The only meta-trained MTL weights the authors published are the ``.npy`` files of their
TensorFlow code (``tensorflow/`` in yaoyao-liu/meta-transfer-learning), one folder per
setting: ``weights.npy``, ``ss_weights.npy`` and ``fc_weights.npy``, each a dict pickled by
``np.save`` under Python 2.7 and read there with
``np.load(path, allow_pickle=True, encoding="latin1").tolist()`` (``trainer/meta.py``).

Keys and layouts, from ``tensorflow/models/resnet12.py`` (``construct_*_weights``):

- ``weights``: per block ``i`` in 1..4, ``block{i}_conv{1,2,3}`` (3, 3, in, out) HWIO
  kernels, ``block{i}_bias{1,2,3}`` (out,), ``block{i}_conv_res`` (1, 1, in, out); plus
  ``w5`` (512, 64) and ``b5`` (64,), the pre-training classifier (dropped).
- ``ss_weights``: ``block{i}_conv{1,2,3}`` (1, 1, in, out), tiled over the 3x3 kernel
  (``process_ss_weights``): one scale per (in, out) kernel, our ``kernel`` granularity;
  ``block{i}_bias{1,2,3}`` (out,), initialised from the pre-trained biases and *replacing*
  them in the meta forward pass, so our shift is ``ss_bias - bias``. The shortcut conv has
  no SS (our layout restores SS only on conv1..3).
- ``fc_weights``: ``w5`` (512, ways), ``b5`` (ways,): theta_0, used as ``x @ w5 + b5``.

Semantics of their forward pass kept by ``resnet12-tf``: SAME-padded 3x3 convs with bias,
BatchNorm, leaky ReLU 0.1 after each of the three convs, a bare 1x1 shortcut added after
the third activation, 2x2 max-pool, and a 5x5 average pool over the 5x5 map at 84 px (a
global mean). BatchNorm is ``tf.contrib.layers.batch_norm`` with its defaults: no scale
(gamma 1), beta a graph variable that is in none of the files (the authors' meta-test
starts it at its initial 0), epsilon 1e-3, and ``is_training=True``: batch statistics at
test time too, computed per call (the support set in one call, the query set in another);
no running statistics exist. The import therefore sets ``bn_stats="batch"``.

Their inner loop (``base_lr`` 1e-3, 100 steps at test) minimises the *sum* of the support
cross-entropies divided by the shots, i.e. ``ways`` times our mean: the imported inner lr
is ``1e-3 * ways``. Their inputs are RGB in [0, 1] (``imread / 255``), no standardisation,
from 84x84 files resized beforehand (MAML's ``proc_images.py``: whole image, Lanczos).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError
from .models import create_backbone
from .models.ss import restore_ss_layout

FILES = ("weights", "ss_weights", "fc_weights")
BLOCKS = 4
CONVS = (1, 2, 3)
TF_BASE_LR = 1e-3  # FLAGS.base_lr / BASE_LR in run_experiment.py
TF_TEST_STEPS = 100  # FLAGS.test_base_epoch_num

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # bytes in Python 3 protocol-2 pickles
}


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: no code from downloaded files."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core"):  # NumPy 2 moved numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                module = module.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


def read_npy_dict(path: Path) -> dict[str, np.ndarray]:
    """A dict saved with ``np.save`` (Python 2 or 3), read without running pickled code."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(fh)
            if not dtype.hasobject:
                raise CheckpointError(f"{path} holds a plain array, not the pickled dict of "
                                      "the authors' TensorFlow release")
            obj = _NumpyOnly(io.BytesIO(fh.read()), encoding="latin1").load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds other objects than numpy arrays ({exc}); it is "
                              "not unpickled for safety") from None
    except (ValueError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or not a .npy file ({exc}); download it "
                              "again") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of arrays")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        key = key.decode("latin1") if isinstance(key, bytes) else str(key)
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry '{key}' is {type(value).__name__}, not an "
                                  "array")
        out[key] = value
    return out


def find_files(path) -> dict[str, Path]:
    """``{"weights": ..., "ss_weights": ..., "fc_weights": ...}`` from a folder or files.

    ``weights`` alone imports the pre-trained network; SS and theta_0 need both others.
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        found = {name: folder / f"{name}.npy" for name in FILES
                 if (folder / f"{name}.npy").is_file()}
        if "weights" not in found:
            raise CheckpointError(f"{folder} has no weights.npy; pass the folder of one setting "
                                  "of the authors' TensorFlow release (weights.npy, "
                                  "ss_weights.npy, fc_weights.npy)")
    else:
        found = {}
        for p in paths:
            stem = p.name[:-4] if p.name.endswith(".npy") else p.name
            kind = next((n for n in ("ss_weights", "fc_weights", "weights")
                         if stem == n or stem.startswith(f"{n}_")), None)
            if kind is None or not p.name.endswith(".npy"):
                raise ConfigError(f"{p} is not one of weights.npy, ss_weights.npy, "
                                  "fc_weights.npy (the authors' TensorFlow release)")
            if kind in found:
                raise ConfigError(f"{p} and {found[kind]} are both {kind} files; pass one")
            found[kind] = p
    if ("ss_weights" in found) != ("fc_weights" in found) or "weights" not in found:
        missing = [f"{n}.npy" for n in FILES if n not in found]
        raise CheckpointError(f"the authors' TensorFlow import needs weights.npy (plus "
                              f"ss_weights.npy and fc_weights.npy for the meta model); "
                              f"missing: {', '.join(missing)}")
    return found


def _take(source: dict, key: str, shape: tuple, where: Path) -> np.ndarray:
    if key not in source:
        raise CheckpointError(f"{where}: key '{key}' is missing (another TensorFlow model, "
                              "or a truncated file?)")
    value = source.pop(key)
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{where}: '{key}' has shape {tuple(value.shape)}, resnet12-tf "
                              f"needs {tuple(shape)} (another backbone or widths?)")
    return value


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clone()


def convert_tf(path, backbone_args: dict, report):
    """Map the release onto ``resnet12-tf`` (+ SS and theta_0 with ``ss_weights``).

    Fills ``report`` and returns ``(backbone_state, head, source, settings)``: what
    :class:`metatransfer.importers._Converted` needs besides the caller's own arguments
    (this module does not import that one).
    """
    files = find_files(path)
    weights = read_npy_dict(files["weights"])
    meta = "ss_weights" in files
    ss = read_npy_dict(files["ss_weights"]) if meta else {}
    fc = read_npy_dict(files["fc_weights"]) if meta else {}
    model = create_backbone("resnet12-tf", in_channels=3, **backbone_args)
    widths = [3] + [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    state: dict[str, torch.Tensor] = {}
    where_w, where_ss = files["weights"], files.get("ss_weights")
    for i in range(1, BLOCKS + 1):
        cin, cout = widths[i - 1], widths[i]
        prefix = f"layer{i}.0"
        for j in CONVS:
            c_in = cin if j == 1 else cout
            kernel = _take(weights, f"block{i}_conv{j}", (3, 3, c_in, cout), where_w)
            bias = _take(weights, f"block{i}_bias{j}", (cout,), where_w)
            state[f"{prefix}.conv{j}.weight"] = _t(kernel.transpose(3, 2, 0, 1))  # HWIO->OIHW
            state[f"{prefix}.conv{j}.bias"] = _t(bias)
            report.mapped += [(f"weights/block{i}_conv{j}", f"{prefix}.conv{j}.weight"),
                              (f"weights/block{i}_bias{j}", f"{prefix}.conv{j}.bias")]
            if meta:
                scale = _take(ss, f"block{i}_conv{j}", (1, 1, c_in, cout), where_ss)
                ss_bias = _take(ss, f"block{i}_bias{j}", (cout,), where_ss)
                state[f"{prefix}.conv{j}.ss_scale"] = _t(scale.transpose(3, 2, 0, 1))
                # their meta forward uses ss_bias instead of the bias: ours adds a shift
                state[f"{prefix}.conv{j}.ss_shift"] = _t(ss_bias.astype(np.float64)
                                                         - bias.astype(np.float64))
                report.mapped += [
                    (f"ss_weights/block{i}_conv{j}", f"{prefix}.conv{j}.ss_scale"),
                    (f"ss_weights/block{i}_bias{j}", f"{prefix}.conv{j}.ss_shift"),
                ]
            state[f"{prefix}.bn{j}.weight"] = torch.ones(cout)
            state[f"{prefix}.bn{j}.bias"] = torch.zeros(cout)
            report.filled += [
                (f"{prefix}.bn{j}.weight", "TF batch_norm without scale: gamma 1"),
                (f"{prefix}.bn{j}.bias", "TF batch_norm beta, in no released file: its "
                                         "initial 0, as in the authors' meta-test"),
            ]
        res = _take(weights, f"block{i}_conv_res", (1, 1, cin, cout), where_w)
        state[f"{prefix}.downsample.0.weight"] = _t(res.transpose(3, 2, 0, 1))
        report.mapped.append((f"weights/block{i}_conv_res", f"{prefix}.downsample.0.weight"))
    for key in ("w5", "b5"):
        if key in weights:
            weights.pop(key)
            report.ignored.append((f"weights/{key}", "pre-training classifier theta_pre "
                                                     "(unused after pre-training)"))
    for name, left in (("weights", weights), ("ss_weights", ss)):
        if left:
            raise CheckpointError(f"{files[name]}: key '{sorted(left)[0]}' has no place in "
                                  "resnet12-tf (another TensorFlow model?)")
    head: dict[str, torch.Tensor] = {}
    settings: dict = {"extra": {"tf_inner_loss": "sum over support / shots",
                                "tf_base_lr": TF_BASE_LR}}
    if meta:
        w5 = fc.pop("w5", None)
        b5 = fc.pop("b5", None)
        if w5 is None or b5 is None:
            raise CheckpointError(f"{files['fc_weights']}: keys 'w5' and 'b5' (theta_0) are "
                                  "required")
        if w5.ndim != 2 or w5.shape[0] != model.out_dim or tuple(b5.shape) != (w5.shape[1],):
            raise CheckpointError(f"{files['fc_weights']}: 'w5' {tuple(w5.shape)} and 'b5' "
                                  f"{tuple(b5.shape)} do not make a ({model.out_dim}, ways) "
                                  "classifier")
        if fc:
            raise CheckpointError(f"{files['fc_weights']}: unexpected key '{sorted(fc)[0]}'")
        head = {"weight": _t(w5.T), "bias": _t(b5)}
        report.mapped += [("fc_weights/w5", "head.weight"), ("fc_weights/b5", "head.bias")]
        ways = int(w5.shape[1])
        settings.update(inner_steps=TF_TEST_STEPS, inner_lr=TF_BASE_LR * ways)
    restore_ss_layout(model, state)  # SS on conv1..3 of each block, as theirs
    model.load_state_dict(state, strict=True)  # final guard: every tensor filled, exactly
    source = str(files["weights"].parent if len({p.parent for p in files.values()}) == 1
                 else files["weights"])
    return state, head, source, settings
