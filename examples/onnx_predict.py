"""Classify images with a model from `mtl export` (onnxruntime, Pillow and numpy only):
`python onnx_predict.py MODEL.onnx IMAGE...` prints `path<TAB>class` per image."""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def preprocess(path: str, p: dict) -> np.ndarray:  # p: the JSON `mtl export` wrote
    size, n, filt = p["size"], p["shorter_side"], getattr(Image, p["interpolation"].upper())
    im = Image.open(path)
    if im.format == "JPEG" and min(im.size) > 2 * (n or size):  # the decoder's fast shrink
        im.draft(p["colour"], (n or size, n or size))
    im = (im.convert("RGBA") if im.mode == "P" else im).convert(p["colour"])
    if n:  # the shorter side to n, then the centre crop
        w, h = im.size
        im = im.resize((n, int(n * h / w)) if w <= h else (int(n * w / h), n), filt)
        left, top = round((im.width - size) / 2), round((im.height - size) / 2)
        im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im.resize((size, size), filt), np.uint8).reshape(size, size, -1)
    x = (255 - x if p["invert"] else x).astype(np.float32) / 255
    return ((x - p["mean"]) / p["std"]).astype(np.float32).transpose(2, 0, 1)  # (c, h, w)


if __name__ == "__main__":
    p = json.loads(Path(sys.argv[1]).with_suffix(".json").read_text())
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    failed = False
    for path in sys.argv[2:]:
        try:
            out = session.run(None, {"image": preprocess(path, p)[None]})[0][0]
            print(f"{path}\t{classes[out.argmax()] if classes else ' '.join(map(str, out))}")
        except Exception as exc:  # not an image, empty, truncated, too many pixels, missing
            print(f"{path}\terror: cannot read this image ({exc})", file=sys.stderr)
            failed = True
    sys.exit(failed)
