"""`mtl serve` under load: client threads on localhost, one request in five malformed.

A real threaded server (werkzeug, as `mtl serve` starts it) on a small meta-trained
Conv-4; 8 threads x 25 requests, every fifth one broken in one of six ways (an empty
file, a JPEG cut short, text named .png, a PNG header claiming 30,000 x 30,000 pixels, a
missing form field, a class with no images). Every good request must get 200 with a
prediction per query, every bad one 400 with a JSON error, none a 5xx, and the server's
memory must stay bounded. Bounded in time too: about 7 s on 2 idle cores; the bound is
on the process's CPU time (30 s), so that other jobs on a shared machine cannot fail it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from malformed import jpeg, malformed_files

from metatransfer.checkpoints import ModelInfo, save_model
from metatransfer.models import create_backbone, enable_ss

pytest.importorskip("flask", reason="Flask is not installed (pip install flask)")
from metatransfer.serve import create_app  # noqa: E402

THREADS, REQUESTS, BAD_EVERY = 8, 25, 5
BAD_KINDS = ("empty.jpg", "truncated.jpg", "notes.png", "huge.png", "missing field",
             "class with no images")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small meta checkpoint (random SS Conv-4 + theta_0): no training needed."""
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=3, width=8)
    enable_ss(backbone)
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=3,
                     image_size=32, mean=[0.5] * 3, std=[0.25] * 3, phase="meta", ways=5,
                     inner_steps=10, inner_lr=0.1, source="synthetic")
    head = {"weight": 0.01 * torch.randn(5, backbone.out_dim), "bias": torch.zeros(5)}
    path = tmp_path_factory.mktemp("load") / "model.safetensors"
    save_model(path, info, backbone, head)
    return path


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes,
                                                                                    str]:
    """A multipart/form-data body and its content type (what a browser or curl sends)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream'
                     "\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def request_for(n: int) -> tuple[str | None, dict[str, str], list[tuple[str, str, bytes]]]:
    """Request number ``n``: ``(what is broken or None, fields, files)``."""
    fields = {"classes": json.dumps(["cat", "dog", "eel"]), "top": "2"}
    files = [(f"support-{c}", f"s{c}_{j}.jpg", jpeg(100 * n + 10 * c + j))
             for c in range(3) for j in range(2)]
    files += [("query", f"q{j}.jpg", jpeg(100 * n + 50 + j)) for j in range(2)]
    kind = BAD_KINDS[(n // BAD_EVERY) % len(BAD_KINDS)] if n % BAD_EVERY == 0 else None
    if kind in malformed_files():
        target = "query" if n % 2 else "support-1"
        files.append((target, kind, malformed_files()[kind]))
    elif kind == "missing field":
        del fields["classes"]
    elif kind == "class with no images":
        fields["classes"] = json.dumps(["cat", "dog", "eel", "fox"])
    return kind, fields, files


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_serve_under_load_answers_200_or_400_never_5xx(checkpoint):
    from werkzeug.serving import make_server

    from metatransfer.serve import _request_log

    app = create_app(checkpoint, device="cpu", max_upload_mb=8)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_request_log())
    url = f"http://127.0.0.1:{server.server_port}/api/predict"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    results: list[tuple[str | None, int, dict]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        for i in range(REQUESTS):
            kind, fields, files = request_for(worker * REQUESTS + i)
            body, content_type = multipart(fields, files)
            req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
            try:
                with urllib.request.urlopen(req, timeout=60) as res:
                    status, text = res.status, res.read()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read()
            with lock:
                results.append((kind, status, json.loads(text)))

    try:
        app.test_client().post(url, data={})  # warm-up (lazy imports) before measuring
        before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
        clients = [threading.Thread(target=client, args=(w,)) for w in range(THREADS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        elapsed, grown = time.perf_counter() - started, rss_mb() - before
        cpu = time.process_time() - cpu
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()
    assert len(results) == THREADS * REQUESTS
    assert not [r for r in results if r[1] >= 500], "a 5xx answer"
    good = [doc for kind, status, doc in results if kind is None and status == 200]
    bad = [(kind, status, doc) for kind, status, doc in results if kind is not None]
    assert len(good) == THREADS * REQUESTS * (BAD_EVERY - 1) // BAD_EVERY
    assert all(len(doc["predictions"]) == 2 and doc["classes"] == ["cat", "dog", "eel"]
               for doc in good)
    assert len(bad) == THREADS * REQUESTS // BAD_EVERY
    assert {kind for kind, _, _ in bad} == set(BAD_KINDS)
    for kind, status, doc in bad:
        assert status == 400 and isinstance(doc.get("error"), str) and doc["error"], kind
        assert "mtl-serve" not in doc["error"]  # temp paths are replaced by upload names
    assert cpu < 30 and elapsed < 120, f"{cpu:.1f} s of CPU, {elapsed:.1f} s"
    assert grown < 300, f"RSS grew by {grown:.0f} MB"
