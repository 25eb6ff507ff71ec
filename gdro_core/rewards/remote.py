"""A reward served over HTTP by another process or team: images go out as PNG, scores come back as JSON.

The protocol (version 1; ``docs/remote-reward.md`` has it with examples). For each batch of at most
``batch_size`` images the client POSTs ``Content-Type: application/json`` to ``url``::

    {"version": 1,
     "prompts":  ["a cat on a mat", ...],        # one per image
     "metadata": ["<the task's target>", ...],   # one per image: the prompt record's metadata string ('' for none)
     "images":   ["<base64 PNG>", ...]}          # one per image, standard base64 of the PNG bytes

and the server answers 200 with::

    {"scores": [0.71, null, ...],                # one per image: a number, or null where it failed
     "errors": [null, "face not found", ...],    # optional: one per image, a string where it failed
     "parts":  {"aesthetic": [...], ...}}        # optional: named columns, one value per image, kept in the table

Only JSON crosses the wire, never pickle. An image with an error (or a null or non-finite score) scores 0 and
keeps the error in its row's ``error`` column, as every reward of the seam does. A server that cannot be
reached, times out or answers 5xx is tried again (``retries`` more times, ``retry_backoff_s`` doubling); a 4xx
is not retried and its body is shown. A reply of the wrong shape (not JSON, wrong lengths, a score that is no
number) is an error naming the server, never a table of zeros.

The reward fails loudly when the server breaks: once more than ``max_error_share`` of the images of one
``score`` call (one scoring chunk of the score stage) carry a per-image error, it raises naming the server
and the share, as soon as the count passes the share (later batches are not sent). ``max_error_share`` unset
is the stage's ``reward.max_error_share``, which the score stage also applies to the whole table.

``preflight`` (``gdro check``) does not contact the server: the check runs wherever the params are edited,
often before the server is started. It checks that ``url`` is a well-formed http(s) URL and that the
environment variable ``token_env`` names is set. ``python -m gdro_core.rewards.reference_server`` serves any
reward class of the seam over this protocol.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from PIL import Image
from pydantic import BaseModel, Field, field_validator

from gdro_core.rewards.base import Progress, RewardError, RewardRecord

PROTOCOL_VERSION = 1
SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie")


class RemoteRewardError(RewardError):
    """A reward server that is down, refuses the request, answers the wrong shape or fails on too many images."""


class Options(BaseModel):
    model_config = {"extra": "forbid"}

    url: str = Field("", description="The server's scoring endpoint, e.g. http://127.0.0.1:8000/score.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take before it is tried again.")
    retries: int = Field(2, ge=0, description="Tries after the first one failed (connection error, timeout, 5xx).")
    retry_backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubles with each retry.")
    batch_size: int = Field(16, ge=1, description="Images per request.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers (nothing secret).")
    token_env: str = Field("", description="Name of an environment variable holding a token, sent as "
                                           "'Authorization: Bearer <token>'.")
    max_error_share: float | None = Field(
        None, ge=0, le=1, description="Share of one score call's images the server may fail on before the reward "
        "raises; unset: reward.max_error_share.")

    @field_validator("headers")
    @classmethod
    def _no_literal_secrets(cls, headers: dict[str, str]) -> dict[str, str]:
        secret = sorted(h for h in headers if h.lower() in SECRET_HEADERS)
        if secret:
            raise ValueError(f"header {secret[0]!r} would put a secret in params.yaml: put the token in an environment "
                             "variable and name that variable in token_env")
        return headers


def url_problem(url: str) -> str:
    """What is wrong with a server URL ('' when it is a well-formed http(s) URL)."""
    if not url:
        return "url is empty: set it to the reward server's scoring endpoint, e.g. http://127.0.0.1:8000/score"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"url {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/score"
    try:
        parts.port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError:
        return f"url {url!r} has a bad port"
    return ""


def png_base64(image: Image.Image) -> str:
    """An image as standard base64 of its PNG bytes (modes PNG cannot hold are sent as RGB)."""
    buf = io.BytesIO()
    try:
        image.save(buf, format="PNG")
    except (OSError, KeyError, ValueError):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RemoteReward:
    """Scores images by POSTing them to a reward server (the protocol is this module's docstring)."""

    name = "remote"
    needs_world = False
    Options = Options

    def __init__(self, url: str = "", timeout_s: float = 60.0, retries: int = 2, retry_backoff_s: float = 1.0,
                 batch_size: int = 16, headers: dict[str, str] | None = None, token_env: str = "",
                 max_error_share: float | None = None):
        problem = url_problem(url)
        if problem:
            raise RemoteRewardError(f"reward 'remote': {problem} (rewards.options.remote.url)")
        self.url, self.timeout_s, self.retries, self.retry_backoff_s = url, timeout_s, retries, retry_backoff_s
        self.batch_size = batch_size
        self.max_error_share = 0.01 if max_error_share is None else max_error_share
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if token_env:
            token = os.environ.get(token_env, "")
            if not token:
                raise RemoteRewardError(f"reward server {url}: the environment variable {token_env} "
                                        "(rewards.options.remote.token_env) is not set: export the server's token")
            self.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_params(cls, params, options: dict) -> RemoteReward:
        """Options as given; ``max_error_share`` unset is the stage's ``reward.max_error_share``."""
        options = dict(options)
        if options.get("max_error_share") is None:
            options["max_error_share"] = params.reward.max_error_share
        return cls(**options)

    @classmethod
    def preflight(cls, options: dict, root: Path) -> list[str]:
        """``url`` well-formed and ``token_env`` set; the server is not contacted (it may start later)."""
        problems = [p for p in [url_problem(options.get("url", ""))] if p]
        env = options.get("token_env", "")
        if env and not os.environ.get(env):
            problems.append(f"token_env: the environment variable {env} is not set: export the server's token")
        return problems

    # --- scoring ----------------------------------------------------------------------------------------

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        n = len(images)
        if len(records) != n:
            raise RemoteRewardError(f"reward server {self.url}: {len(records)} prompt records for {n} images")
        rewards: list[float] = []
        errors: list[str] = []
        parts: dict[str, list[Any]] = {}
        for start in range(0, n, self.batch_size):
            batch, recs = images[start : start + self.batch_size], records[start : start + self.batch_size]
            body = {"version": PROTOCOL_VERSION, "prompts": [str(r.prompt) for r in recs],
                    "metadata": [str(r.target) for r in recs], "images": [png_base64(im) for im in batch]}
            scores, errs, cols = self._parse(self._post(body), len(batch))
            for name in cols:
                if name not in parts and name not in ("reward", "error"):
                    parts[name] = [None] * start
            for name, values in parts.items():
                values.extend(cols.get(name, [None] * len(batch)))
            for s, e in zip(scores, errs):
                if not e and (s is None or not math.isfinite(s)):
                    e = f"the server returned no score ({s})" if s is not None else "the server returned no score"
                rewards.append(0.0 if e else float(s))
                errors.append(e)
            failed = sum(bool(e) for e in errors)
            if failed > self.max_error_share * n:
                first = next(e for e in errors if e)
                raise RemoteRewardError(
                    f"reward server {self.url} failed on {failed} of {n} images ({failed / n:.1%} > "
                    f"rewards.options.remote.max_error_share {self.max_error_share:.1%}); first error: {first}. "
                    "Fix the server, or raise max_error_share")
            if progress:
                progress(len(rewards), n)
        return pd.DataFrame({"reward": pd.Series(rewards, dtype=float), **parts, "error": pd.Series(errors, dtype=str)})

    def _post(self, body: dict) -> Any:
        """The server's decoded JSON answer; connection errors, timeouts and 5xx are tried again with backoff."""
        data = json.dumps(body, allow_nan=False).encode()
        tries = self.retries + 1
        kind, last = "", ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                text = _body(err)
                if err.code < 500:
                    raise RemoteRewardError(f"reward server {self.url} refused the request: HTTP {err.code} "
                                            f"{err.reason}: {text}") from None
                kind, last = "http", f"HTTP {err.code} {err.reason}: {text}"
                continue
            except urllib.error.URLError as err:
                timed_out = isinstance(err.reason, TimeoutError)
                kind, last = ("timeout", "") if timed_out else ("down", _reason(err.reason))
                continue
            except TimeoutError:
                kind, last = "timeout", ""
                continue
            except (OSError, http.client.HTTPException) as err:  # reset, dropped or cut off while answering
                kind, last = "down", _reason(err)
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise RemoteRewardError(f"reward server {self.url} answered with no JSON: "
                                        f"{raw[:200].decode(errors='replace')!r}") from None
        after = f"after {tries} {'try' if tries == 1 else 'tries'}"
        if kind == "http":
            raise RemoteRewardError(f"reward server {self.url} failed {after} ({last}): see the server's log")
        if kind == "timeout":
            raise RemoteRewardError(f"reward server {self.url} did not answer within {self.timeout_s:g} s {after}: "
                                    "check the server, or raise rewards.options.remote.timeout_s")
        raise RemoteRewardError(f"reward server {self.url} is unreachable ({last}) {after}: start it or fix "
                                "rewards.options.remote.url")

    def _parse(self, answer: Any, n: int) -> tuple[list[float | None], list[str], dict[str, list[Any]]]:
        """Scores, error texts ('' when scored) and parts of one batch, or an error naming the wrong shape."""
        def wrong(what: str) -> RemoteRewardError:
            return RemoteRewardError(f"reward server {self.url} answered with the wrong shape: {what} "
                                     "(see docs/remote-reward.md for the protocol)")

        if not isinstance(answer, dict) or "scores" not in answer:
            raise wrong(f"expected an object with 'scores', got {json.dumps(answer)[:120]}")
        scores = answer["scores"]
        if not isinstance(scores, list):
            raise wrong(f"'scores' is a {type(scores).__name__}, not a list of {n} numbers")
        if len(scores) != n:
            raise wrong(f"'scores' has {len(scores)} entries for {n} images")
        bad = [s for s in scores if s is not None and not _is_number(s)]
        if bad:
            raise wrong(f"'scores' holds {bad[0]!r}, which is no number or null")
        errs = answer.get("errors")
        if errs is None:
            errs = [None] * n
        if not isinstance(errs, list) or len(errs) != n:
            raise wrong(f"'errors' is not a list of {n} entries")
        if any(e is not None and not isinstance(e, str) for e in errs):
            raise wrong("'errors' holds an entry that is no string or null")
        parts = answer.get("parts") or {}
        if not isinstance(parts, dict):
            raise wrong("'parts' is not an object of named lists")
        for name, values in parts.items():
            if not isinstance(values, list) or len(values) != n:
                raise wrong(f"part {name!r} is not a list of {n} values")
        return scores, [e or "" for e in errs], parts


def _body(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode(errors="replace")
    except OSError:
        text = ""
    return " ".join(text.split())[:500] or "(no body)"


def _reason(reason: Any) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host: {reason.strerror or reason}"
    if isinstance(reason, BaseException):
        return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__.lower()
    return str(reason)
