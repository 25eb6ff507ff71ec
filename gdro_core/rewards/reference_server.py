"""A reference reward server: any reward class of the seam served over the remote-reward protocol.

::

    python -m gdro_core.rewards.reference_server --port 8000                      # the toy brightness reward
    python -m gdro_core.rewards.reference_server --port 8000 --reward my_module:Class --options '{"scale": 2}'

It answers ``POST /score`` (the protocol of :mod:`gdro_core.rewards.remote`) and ``GET /health``, binds
127.0.0.1 unless ``--host`` says otherwise, and with ``--token-env NAME`` refuses (401) requests without
``Authorization: Bearer $NAME``. Requests are scored one at a time (a reward need not be thread-safe). A bad
request is a 400 with ``{"error": ...}``; a reward that raises is a 500 with its message. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.rewards.remote import PROTOCOL_VERSION

MAX_BODY = 512 * 1024 * 1024


class Brightness:
    """The toy reward: each image's mean grey level in [0, 1], with its size as a part."""

    name, needs_world = "brightness", False

    def score(self, images: list[Image.Image], records: Sequence, progress=None) -> pd.DataFrame:
        values = [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]
        return pd.DataFrame({"reward": values, "pixels": [im.width * im.height for im in images]})


@dataclass(frozen=True)
class Record:
    """A prompt record as a reward reads it."""

    prompt: str
    target: str


class BadRequest(ValueError):
    pass


def _jsonable(value: Any) -> Any:
    """A table cell as JSON: numbers (non-finite as null), strings, booleans, null; anything else as text."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def decode_request(body: dict) -> tuple[list[Image.Image], list[Record]]:
    """The images and prompt records of a request, or :class:`BadRequest` saying what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object with prompts, metadata and images")
    version = body.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise BadRequest(f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION}")
    images, prompts = body.get("images"), body.get("prompts")
    metadata = body.get("metadata", [""] * len(images or []))
    for key, value in (("images", images), ("prompts", prompts), ("metadata", metadata)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"'{key}' must be a list of strings")
    if not len(images) == len(prompts) == len(metadata):
        raise BadRequest(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries: "
                         "give one of each per image")
    decoded = []
    for i, text in enumerate(images):
        try:
            im = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            im.load()
        except (binascii.Error, OSError, ValueError, SyntaxError) as err:
            raise BadRequest(f"image {i} is not base64 PNG ({type(err).__name__})") from None
        decoded.append(im)
    return decoded, [Record(p, m) for p, m in zip(prompts, metadata)]


def encode_scores(table: pd.DataFrame, n: int) -> dict:
    """A reward's table as the protocol's answer: scores, errors and every other column as a part."""
    if "reward" not in table or len(table) != n:
        raise RuntimeError(f"the reward returned {len(table)} rows (columns {list(table.columns)}) for {n} images: "
                           "it must return one row per image with 'reward'")
    table = table.reset_index(drop=True)
    scores = [_jsonable(v) for v in pd.to_numeric(table["reward"], errors="coerce")]
    errors = [str(e) if isinstance(e, str) and e else None for e in table["error"]] if "error" in table else [None] * n
    parts = {str(c): [_jsonable(v) for v in table[c]] for c in table.columns if c not in ("reward", "error")}
    return {"version": PROTOCOL_VERSION, "scores": scores, "errors": errors, "parts": parts}


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, token: str = "",
                path: str = "/score") -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) that scores requests with ``reward``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload, allow_nan=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._send(200, {"ok": True, "reward": getattr(reward, "name", type(reward).__name__),
                                 "version": PROTOCOL_VERSION})
            else:
                self._send(404, {"error": f"no {self.path}: POST images to {path}, GET /health"})

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                return self._send(400, {"error": "Content-Length is no number"})
            if length > MAX_BODY:
                self.close_connection = True
                return self._send(413, {"error": f"request of {length} bytes is over {MAX_BODY}: send smaller batches"})
            raw = self.rfile.read(length)
            if self.path != path:
                return self._send(404, {"error": f"no {self.path}: POST images to {path}"})
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                return self._send(401, {"error": "missing or wrong bearer token"})
            try:
                images, records = decode_request(json.loads(raw))
            except ValueError as err:  # BadRequest, or JSON that does not parse
                return self._send(400, {"error": str(err)})
            try:
                with lock:
                    table = reward.score(images, records)
                answer = encode_scores(table, len(images))
            except Exception as err:  # noqa: BLE001 - the client shows it; the server keeps serving
                return self._send(500, {"error": f"{type(err).__name__}: {err}"})
            self._send(200, answer)

        def log_message(self, format: str, *args) -> None:
            if os.environ.get("GDRO_REWARD_SERVER_QUIET") != "1":
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def build_reward(spec: str, options: dict, params_path: str = "", root: Path = Path(".")):
    """The reward to serve: ``brightness`` (the toy), or a name / ``module:Class`` of the seam."""
    if spec == "brightness":
        return Brightness()
    from gdro_core.rewards.registry import reward_class, reward_options

    cls = reward_class(spec, root)
    options = reward_options(spec, cls, options)
    if hasattr(cls, "from_params"):
        from gdro_core.params import load_params, parse_params

        params = load_params(params_path) if params_path else parse_params({})
        return cls.from_params(params, options)
    return cls(**options)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--reward", default="brightness",
                    help="'brightness' (toy), a reward name, or module:Class of the rewards seam")
    ap.add_argument("--options", default="{}", help="the reward's options as JSON")
    ap.add_argument("--params", default="", help="params.yaml, for rewards built from params (ocr, geneval)")
    ap.add_argument("--token-env", default="", help="environment variable holding the bearer token to require")
    ap.add_argument("--path", default="/score", help="the scoring endpoint's path")
    args = ap.parse_args(argv)
    token = os.environ.get(args.token_env, "") if args.token_env else ""
    if args.token_env and not token:
        ap.error(f"the environment variable {args.token_env} is not set")
    reward = build_reward(args.reward, json.loads(args.options), args.params)
    server = make_server(reward, args.host, args.port, token, args.path)
    host, port = server.server_address[:2]
    print(f"serving reward {getattr(reward, 'name', args.reward)!r} at http://{host}:{port}{args.path}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
