"""Serve a registered ensemble over HTTP: ``inception-serve --model models:/NAME@champion``.

MLflow's scoring protocol (POST ``/invocations`` with ``dataframe_split`` / ``dataframe_records`` /
``inputs`` / ``instances`` JSON, answered by MLflow's own parser and our pyfunc), plus ``/predict``
for one raw image body (``curl --data-binary @cat.jpg``), on 127.0.0.1 unless the server is opened
with a bearer token. Every error reply is a short JSON message of ours::

    {"error_code": "BAD_REQUEST", "message": "..."}

never the request's content: MLflow's scoring server (``mlflow models serve``) answers a malformed
body with its own validation message, which carries the payload back (a 100 kB body came back as
200 kB). Here a message from our model (:class:`ops.ensemble_model.EnsembleInputError`, which names a
column or a row) passes; any other error becomes a fixed message per kind, and a middleware replaces
whatever else answers 4xx/5xx. Bodies above ``--max-request-mb`` are refused before they are read
whole.

``served()`` runs the same server in a child process for as long as a ``with`` block runs (the
serving tests and ``benchmarks.bench_serving``)::

    with served("models:/inception@champion", tracking_uri, log_path="serve.log") as url:
        requests.post(f"{url}/invocations", json={...})
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ops.ensemble_model import IMAGE_COLUMN, MAX_ERROR_CHARS, EnsembleInputError

HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_MAX_REQUEST_MB = 64.0
JSON_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
OPEN_PATHS = ("/ping", "/health")  # health checks answer without a token
FORMAT_HINT = (
    "POST JSON with one column 'image' of base64 JPEG bytes as dataframe_split, dataframe_records, "
    "inputs or instances (optional params: top_k, crops), or one raw image body to /predict"
)
# The message per kind of failure that is not our model's own (MLflow's messages quote the request).
GENERIC = {
    400: "the request is not one this model reads: " + FORMAT_HINT,
    413: "the request body is larger than this server accepts (inception-serve --max-request-mb)",
    415: "unsupported content type: send application/json to /invocations, image bytes to /predict",
    500: "the model failed on this request; the server's log has the details",
}
MARK = b"x-inception-reply"  # set on replies built here; the middleware strips it

log = logging.getLogger("inception.serve")


def error_body(status: int, message: str) -> bytes:
    code = "BAD_REQUEST" if status == 400 else HTTPStatus(status).name
    return json.dumps({"error_code": code, "message": message[:MAX_ERROR_CHARS]}).encode()


# ---- the app ---------------------------------------------------------------------------------------


def _reply(status: int, content: bytes, media_type: str = "application/json"):
    from starlette.responses import Response

    return Response(content=content, status_code=status, media_type=media_type, headers={MARK.decode(): "1"})


def _error(status: int, message: str | None = None):
    return _reply(status, error_body(status, message or GENERIC.get(status) or HTTPStatus(status).phrase))


def _json_problem(body: bytes) -> str | None:
    """What is wrong with a JSON body before MLflow parses it, in words that quote none of it."""
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        return "the body is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if not isinstance(doc, dict):
        return f"the body must be a JSON object, got a JSON {type(doc).__name__}; " + FORMAT_HINT
    keys = [k for k in JSON_KEYS if k in doc]
    if len(keys) != 1:
        return f"the body needs exactly one of {', '.join(JSON_KEYS)} (found {len(keys)}); " + FORMAT_HINT
    params = doc.get("params", {})
    if not isinstance(params, dict):
        return 'params must be a JSON object, e.g. {"top_k": 5, "crops": 10}'
    for key in ("top_k", "crops"):
        if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool)):
            return f"params.{key} must be an integer, got a JSON {type(params[key]).__name__}"
    return None


def _is_ours(exc: BaseException) -> bool:
    # by name too: a model loaded from its logged code_paths copy has its own class object
    return isinstance(exc, EnsembleInputError) or type(exc).__name__ == EnsembleInputError.__name__


def score(model: Any, body: bytes, content_type: str, input_schema: Any):
    """One ``/invocations`` request through MLflow's scoring function; the reply is ours."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    mime = content_type.split(";")[0].strip().lower()
    if mime == "application/json":
        problem = _json_problem(body)
        if problem:
            return _error(400, problem)
    try:
        result = scoring_server.invocations(body, content_type, model, input_schema)
    except MlflowException as exc:
        if _is_ours(exc):
            return _error(400, exc.message)
        status = exc.get_http_status_code()
        log.warning("scoring refused a %d-byte request: %s", len(body), type(exc).__name__)
        return _error(status if status in GENERIC else 400)
    except Exception as exc:  # noqa: BLE001 - a reply of ours instead of a traceback
        log.error("scoring failed on a %d-byte request: %s", len(body), type(exc).__name__)
        return _error(500)
    if result.status != 200:
        return _error(result.status if result.status in GENERIC else 400)
    return _reply(200, result.response.encode())


def predict_raw(model: Any, body: bytes, top_k: int | None, crops: int | None):
    """``/predict``: one image as the whole body, params in the query string."""
    import pandas as pd
    from mlflow.pyfunc import scoring_server

    if not body:
        return _error(400, "the body is empty: send the image file's bytes (curl --data-binary @cat.jpg)")
    params = {k: v for k, v in (("top_k", top_k), ("crops", crops)) if v is not None}
    try:
        predictions = model.predict(pd.DataFrame({IMAGE_COLUMN: [body]}), params=params or None)
    except Exception as exc:  # noqa: BLE001
        if _is_ours(exc):
            return _error(400, exc.message)
        log.error("prediction failed on a %d-byte image: %s", len(body), type(exc).__name__)
        return _error(500)
    out = io.StringIO()
    scoring_server.predictions_to_json(predictions, out)
    return _reply(200, out.getvalue().encode())


def build_app(model: Any, *, token: str | None = None, max_request_bytes: int | None = None):
    """The ASGI app: routes of ours around MLflow's scoring function, behind :class:`GuardedErrors`."""
    import mlflow
    from starlette.applications import Starlette
    from starlette.routing import Route

    input_schema = model.metadata.get_input_schema()

    async def ping(request):
        return _reply(200, b"\n")

    async def version(request):
        return _reply(200, mlflow.__version__.encode(), "text/plain")

    async def invocations(request):
        body = await request.body()
        content_type = request.headers.get("content-type") or ""
        return await asyncio.to_thread(score, model, body, content_type, input_schema)

    async def predict(request):
        query = request.query_params
        try:
            top_k = int(query["top_k"]) if "top_k" in query else None
            crops = int(query["crops"]) if "crops" in query else None
        except ValueError:
            return _error(400, "top_k and crops in the query string must be integers")
        body = await request.body()
        return await asyncio.to_thread(predict_raw, model, body, top_k, crops)

    app = Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/health", ping, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/predict", predict, methods=["POST"]),
        ]
    )
    limit = int(max_request_bytes or DEFAULT_MAX_REQUEST_MB * 2**20)
    return GuardedErrors(app, token=token, max_request_bytes=limit)


class GuardedErrors:
    """ASGI middleware: bearer-token check, request size limit, and no 4xx/5xx body but ours.

    A reply not built by this module (Starlette's 404/405, anything a library answers) keeps its
    status and gets a fixed message instead of its body."""

    def __init__(self, app, *, token: str | None, max_request_bytes: int) -> None:
        self.app, self.token, self.max_request_bytes = app, token, max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await self._send(
                    send, 401, "missing or wrong bearer token (Authorization: Bearer ...)"
                )
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return await self._send(send, 413, GENERIC[413])
        body, more = b"", True
        while more:  # read the body here so its size is bounded whatever the framing
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await self._send(send, 413, GENERIC[413])
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, _Guard(send))

    @staticmethod
    async def _send(send, status: int, message: str) -> None:
        content = error_body(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})


class _Guard:
    """The ``send`` of one request: passes our replies (minus the mark), rewrites other errors."""

    def __init__(self, send) -> None:
        self.send, self.replace_status = send, None

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k != MARK]
            ours = len(headers) != len(message.get("headers", []))
            if message["status"] >= 400 and not ours:
                self.replace_status = message["status"]
                return None
            return await self.send({**message, "headers": headers})
        if self.replace_status is None:
            return await self.send(message)
        if not message.get("more_body", False):  # the foreign body is dropped; ours goes out once
            status = self.replace_status
            await GuardedErrors._send(self.send, status, GENERIC.get(status) or HTTPStatus(status).phrase)
        return None


# ---- the command -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if len(token) < 16:
        raise SystemExit(f"inception-serve: the token in {path} is shorter than 16 characters")
    return token


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inception-serve",
        description="Serve a registered Inception ensemble over HTTP (MLflow's scoring protocol, plus "
        "/predict for a raw image body). Error replies never carry the request back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION or a local model folder"
    )
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow registry to resolve models:/ URIs (default: $MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--host", default=HOST, help="interface to listen on; other than loopback needs --token-file"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--token-file",
        help="file holding a bearer token (>= 16 characters); clients send 'Authorization: Bearer TOKEN'",
    )
    p.add_argument(
        "--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB, help="largest request body"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    token = read_token(args.token_file)
    if not is_loopback(args.host) and token is None:
        print(
            f"inception-serve: --host {args.host} opens the server to the network; give --token-file "
            "(clients then send a bearer token), or keep 127.0.0.1 behind an authenticating proxy",
            file=sys.stderr,
        )
        return 2
    if args.max_request_mb <= 0:
        print("inception-serve: --max-request-mb must be above 0", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"inception-serve: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from ops.registry import RegistryError, load

    started = time.monotonic()
    try:
        model = load(args.model, tracking_uri=args.tracking_uri)
    except RegistryError as exc:
        print(f"inception-serve: {exc}", file=sys.stderr)
        return 1
    app = build_app(model, token=token, max_request_bytes=int(args.max_request_mb * 2**20))
    log.info(
        "loaded %s in %.1f s; serving http://%s:%d (POST /invocations, /predict; Ctrl-C stops)%s",
        args.model,
        time.monotonic() - started,
        args.host,
        args.port,
        " with a bearer token" if token else "",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


# ---- a server for a with block ---------------------------------------------------------------------


class ServeError(RuntimeError):
    """The server did not come up; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def served(
    model_uri: str,
    tracking_uri: str,
    *,
    log_path: str | Path,
    port: int = 0,
    start_timeout_s: float = 240.0,
    env: dict | None = None,
    extra_args: list[str] | None = None,
) -> Iterator[str]:
    """Start ``inception-serve`` in a child process, wait for ``/ping``, yield its URL, stop it."""
    import requests

    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "ops.serving",
        "--model",
        model_uri,
        "--tracking-uri",
        tracking_uri,
        "--host",
        HOST,
        "--port",
        str(port),
        *(extra_args or []),
    ]
    root = str(Path(__file__).resolve().parent.parent)  # the child runs this same code
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    environ.update(env or {})
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=environ
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log_file.flush()
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise ServeError(f"inception-serve did not come up at {url}:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


if __name__ == "__main__":
    sys.exit(main())
