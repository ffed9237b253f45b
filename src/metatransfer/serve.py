"""``mtl serve``: a local web page for few-shot classification of your own images.

One page (``web/index.html``): drop a few images per class, name the classes, drop query
images, see the predicted class and probabilities of each. The server is a small Flask
app around :class:`metatransfer.adapt.FewShotClassifier`; every request carries its own
support and query images, so nothing is kept between requests. ``create_app`` builds the
app without starting a server (tests use Flask's test client).

API: ``GET /api/info`` (methods, limits); ``POST /api/predict`` multipart with
``classes`` (JSON list of names), files ``support-<i>`` for class ``i``, files ``query``,
optional ``method`` and ``top``; answers JSON (``method``, ``classes``, ``shots``,
``predictions``: per query ``name``, ``prediction``, ``probability``, ``probabilities``,
``top``; ``warnings``: e.g. support images that look inverted against the training
data), errors as ``{"error": message}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
import threading
from importlib import resources
from pathlib import Path

from .errors import MTLError

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 32.0


def _flask():
    try:
        import flask
    except ImportError:
        raise MTLError("`mtl serve` needs Flask: pip install flask") from None
    return flask


def create_app(checkpoint: str | Path, method: str | None = None, device: str = "auto",
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, inner_steps: int | None = None,
               inner_lr: float | None = None, amp: str = "auto"):
    """The Flask app for ``checkpoint``; ``method`` is the default the page starts with."""
    flask = _flask()
    from werkzeug.exceptions import RequestEntityTooLarge

    from .adapt import load_classifiers, top_k
    from .loader import available_methods, find_checkpoints

    if max_upload_mb <= 0:
        raise MTLError("--max-upload-mb must be positive")
    methods = available_methods(find_checkpoints(checkpoint))
    if method is not None and method not in methods:
        raise MTLError(f"method '{method}' is not available with this checkpoint "
                       f"(available: {', '.join(methods) or 'none'})")
    if not methods:
        raise MTLError(f"{checkpoint}: no usable model for mtl, ft or protonet")
    classifiers = dict(zip(methods, load_classifiers(checkpoint, methods, device, inner_steps,
                                                     inner_lr, amp), strict=True))
    default = method or methods[0]
    lock = threading.Lock()  # one fit+predict at a time: the classifiers hold state
    limit = int(max_upload_mb * 1024 * 1024)
    info = classifiers[default].info

    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit

    def error(message: str, status: int = 400):
        return flask.jsonify(error=message), status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc):
        return error(f"upload refused: larger than the {max_upload_mb:g} MB limit; send fewer "
                     "or smaller images (or restart with a higher --max-upload-mb)", 413)

    @app.errorhandler(MTLError)
    def user_error(exc):
        return error(str(exc))

    @app.get("/")
    def index():
        page = resources.files("metatransfer") / "web" / "index.html"
        return flask.Response(page.read_text(encoding="utf-8"), mimetype="text/html")

    @app.get("/api/info")
    def api_info():
        return flask.jsonify(methods=methods, method=default, checkpoint=str(checkpoint),
                             source=info.source, backbone=info.backbone,
                             image_size=info.image_size, channels=info.in_channels,
                             max_upload_mb=max_upload_mb, device=str(classifiers[default].device))

    @app.post("/api/predict")
    def api_predict():
        form, files = flask.request.form, flask.request.files
        chosen = form.get("method") or default
        if chosen not in classifiers:
            return error(f"method '{chosen}' is not available (available: {', '.join(methods)})")
        try:
            names = json.loads(form.get("classes", "[]"))
            top = int(form.get("top", 3))
        except ValueError:
            return error("malformed request: 'classes' must be a JSON list, 'top' an integer")
        if not isinstance(names, list):
            return error("malformed request: 'classes' must be a JSON list of names")
        names = [str(n).strip() for n in names]
        for i, name in enumerate(names):
            if not name:
                return error(f"class {i + 1} has no name; type a name for every class")
        if len(names) < 2:
            return error(f"{len(names)} class{'es' if len(names) != 1 else ''} given; few-shot "
                         "classification needs at least 2 classes")
        queries = files.getlist("query")
        if not queries:
            return error("no query images; drop the images to classify")
        with tempfile.TemporaryDirectory(prefix="mtl-serve-") as tmp:
            store = _Uploads(Path(tmp))
            support = {name: store.save_all(files.getlist(f"support-{i}"))
                       for i, name in enumerate(names)}
            query_paths = store.save_all(queries)
            clf = classifiers[chosen]
            try:
                with lock:
                    clf.fit(support)
                    probs = clf.predict_proba(query_paths)
            except MTLError as exc:
                return error(store.readable(str(exc)))
        ranked = top_k(probs, clf.classes_, max(1, min(top, len(clf.classes_))))
        return flask.jsonify(
            method=chosen, classes=clf.classes_, shots=clf.shots(),
            warnings=[store.readable(w) for w in clf.warnings],
            predictions=[{"name": store.names[str(p)], "prediction": r[0][0],
                          "probability": r[0][1], "probabilities": row.tolist(),
                          "top": [{"class": c, "probability": q} for c, q in r]}
                         for p, r, row in zip(query_paths, ranked, probs, strict=True)])

    return app


class _Uploads:
    """Uploaded files saved under a temp folder, so they are decoded exactly like files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: dict[str, str] = {}  # saved path -> the name the user uploaded

    def save_all(self, uploads) -> list[Path]:
        paths = []
        for up in uploads:
            name = Path(up.filename or "upload").name or "upload"
            path = self.folder / f"{len(self.names):05d}{Path(name).suffix.lower()}"
            up.save(path)
            self.names[str(path)] = name
            paths.append(path)
        return paths

    def readable(self, message: str) -> str:
        """Replace temp paths in a message by the uploaded file names."""
        for path, name in self.names.items():
            message = message.replace(path, f"'{name}'")
        return message


def _check_port(host: str, port: int) -> None:
    """Fail with one clear line when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise MTLError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                       "another --port or --host") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    from werkzeug.serving import make_server

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _check_port(args.host, args.port)  # werkzeug would print two lines and exit instead
    app = create_app(args.checkpoint, args.method, args.device, args.max_upload_mb,
                     args.inner_steps, args.inner_lr, args.amp)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the page",
                    args.host)
    server = make_server(args.host, args.port, app, threaded=True,
                         request_handler=_request_log())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"few-shot page on http://{host}:{server.server_port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _request_log():
    """Werkzeug's request handler, its log lines without ANSI colours unless stderr is a
    terminal (a log redirected to a file stays plain text)."""
    import sys

    from werkzeug.serving import WSGIRequestHandler

    class RequestLog(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if sys.stderr.isatty():
                return super().log_request(code, size)
            line = str(getattr(self, "requestline", "")).translate(self._control_char_table)
            self.log("info", '"%s" %s %s', line, code, size)

    return RequestLog

