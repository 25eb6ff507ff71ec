"""The remote reward: images scored by a reward server over HTTP (JSON and base64 PNG), equal to the served reward
computed locally; a server that is down, answers 5xx, 4xx or the wrong shape, or fails on too many images, is
an error naming the server instead of a table of zeros."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from gdro_core import preflight
from gdro_core.params import parse_params
from gdro_core.rewards.base import RewardError
from gdro_core.rewards.reference_server import Brightness, Record, build_reward, make_server
from gdro_core.rewards.registry import make_reward
from gdro_core.rewards.remote import RemoteReward
from gdro_core.tasks.ocr.task import OcrTask

USER_REWARDS = '''
import pandas as pd


class Length:
    """Prompt length plus target length; fails on prompts that contain 'boom'."""
    name, needs_world = "length", False

    def score(self, images, records, progress=None):
        rows = [{"reward": float("nan"), "error": "boom"} if "boom" in r.prompt else
                {"reward": float(len(r.prompt) + len(r.target)), "error": ""} for r in records]
        return pd.DataFrame(rows)


class FlakyOnce:
    """Raises on its first call (the server answers 500), then scores 1 per image."""
    name, needs_world = "flaky", False
    calls = 0

    def score(self, images, records, progress=None):
        FlakyOnce.calls += 1
        if FlakyOnce.calls == 1:
            raise RuntimeError("model not warmed up")
        return pd.DataFrame({"reward": [1.0] * len(images)})
'''


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "served.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GDRO_REWARD_SERVER_QUIET", "1")
    yield tmp_path
    sys.modules.pop("served", None)


@contextmanager
def serving(server: ThreadingHTTPServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def reference(reward, token: str = ""):
    with serving(make_server(reward, "127.0.0.1", 0, token)) as base:
        yield f"{base}/score"


@contextmanager
def answering(answer):
    """A server that answers every POST with ``answer(n_images) -> (status, JSON-able body)``."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            status, payload = answer(len(body["images"]))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as base:
        yield f"{base}/score", seen


def grey(value: int, size=(8, 4), mode="L") -> Image.Image:
    return Image.new(mode, size, value if mode == "L" else (value,) * 3)


def remote_params(url: str, **options) -> dict:
    return {"rewards": {"weights": {"remote": 1.0}, "options": {"remote": {"url": url, **options}}}}


IMAGES = [grey(0), grey(51), grey(255, (5, 3)), grey(102, mode="RGB"), grey(204)]
RECORDS = [Record("a cat", "CAT"), Record("a dog", ""), Record("an owl", "OWL"), Record("a fox", "F"),
           Record("a bee", "BEE")]
FAST = {"timeout_s": 2.0, "retries": 1, "retry_backoff_s": 0.01}


def test_a_served_reward_scores_as_it_does_locally(user_rewards):
    local = Brightness().score(IMAGES, RECORDS)
    with reference(build_reward("brightness", {})) as url:
        steps = []
        reward = make_reward("remote", parse_params(remote_params(url, batch_size=2, **FAST)))
        table = reward.score(IMAGES, RECORDS, lambda done, n: steps.append((done, n)))
    assert table["reward"].tolist() == pytest.approx(local["reward"].tolist(), abs=1e-12)
    assert table["pixels"].tolist() == local["pixels"].tolist()  # the server's parts come back as columns
    assert table["error"].tolist() == [""] * 5
    assert steps == [(2, 5), (4, 5), (5, 5)]  # one request per batch of 2
    with reference(build_reward("served:Length", {})) as url:  # prompts and metadata (targets) reach the reward
        table = make_reward("remote", parse_params(remote_params(url, **FAST))).score(IMAGES, RECORDS)
    assert table["reward"].tolist() == [8.0, 5.0, 9.0, 6.0, 8.0]


def test_a_remote_reward_in_a_weighted_sum(user_rewards):
    with reference(build_reward("served:Length", {})) as url:
        p = parse_params({"rewards": {"weights": {"remote": 0.5, "served:Length": 2.0},
                                      "options": {"remote": {"url": url, **FAST}}}})
        task = OcrTask(p)
        records = [task.record('"AB" on a sign', "AB"), task.record('"C" on a sign', "C")]
        table = task.reward([grey(255), grey(0)], records)
    local = [len(r.prompt) + len(r.target) for r in records]
    assert table["remote"].tolist() == pytest.approx(local)
    assert table["reward"].tolist() == pytest.approx([2.5 * v for v in local])
    assert table["error"].tolist() == ["", ""]


def test_a_server_that_is_down_is_named_in_one_line():
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    reward = make_reward("remote", parse_params(remote_params(url, **FAST)))
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        reward.score(IMAGES[:1], RECORDS[:1])
    assert time.monotonic() - start < 5
    assert str(err.value) == (f"reward server {url} is unreachable (connection refused) after 2 tries: start it or "
                              "fix rewards.options.remote.url")


def test_a_server_that_does_not_answer_in_time_is_named():
    with answering(lambda n: (time.sleep(0.6), (200, {"scores": [1.0] * n}))[1]) as (url, seen):
        reward = make_reward("remote", parse_params(remote_params(url, timeout_s=0.2, retries=0)))
        with pytest.raises(RewardError, match=rf"^reward server {url} did not answer within 0.2 s after 1 try: "
                                              r".*rewards.options.remote.timeout_s$"):
            reward.score(IMAGES[:1], RECORDS[:1])
    assert len(seen) == 1


def test_a_5xx_is_tried_again_and_a_4xx_is_not(user_rewards, monkeypatch):
    with reference(build_reward("served:FlakyOnce", {})) as url:
        reward = make_reward("remote", parse_params(remote_params(url, **FAST)))
        assert reward.score(IMAGES[:2], RECORDS[:2])["reward"].tolist() == [1.0, 1.0]
    calls = []
    with answering(lambda n: (calls.append(n), (503, {"error": "overloaded"}))[1]) as (url, _):
        reward = make_reward("remote", parse_params(remote_params(url, **{**FAST, "retries": 2})))
        with pytest.raises(RewardError, match=r"failed after 3 tries \(HTTP 503 .*overloaded"):
            reward.score(IMAGES[:1], RECORDS[:1])
    assert len(calls) == 3
    monkeypatch.setenv("REWARD_TOKEN", "s3cret")
    with reference(Brightness(), token="s3cret") as url:
        with pytest.raises(RewardError, match=r"refused the request: HTTP 401 .*missing or wrong bearer token"):
            make_reward("remote", parse_params(remote_params(url, **FAST))).score(IMAGES[:1], RECORDS[:1])
        with_token = make_reward("remote", parse_params(remote_params(url, token_env="REWARD_TOKEN", **FAST)))
        assert with_token.score(IMAGES[:1], RECORDS[:1])["reward"].tolist() == [0.0]
    calls.clear()
    with (answering(lambda n: (calls.append(n), (422, {"detail": "prompt too long"}))[1]) as (url, _),
          pytest.raises(RewardError, match="HTTP 422 .*prompt too long")):
        make_reward("remote", parse_params(remote_params(url, **FAST))).score(IMAGES[:1], RECORDS[:1])
    assert len(calls) == 1


def test_per_image_errors_are_kept_under_the_share_and_fail_over_it(user_rewards):
    records = [Record("a boom", ""), *RECORDS[1:]]
    with reference(build_reward("served:Length", {})) as url:
        kept = make_reward("remote", parse_params(remote_params(url, max_error_share=0.2, **FAST)))
        table = kept.score(IMAGES, records)
        assert table["reward"].tolist() == [0.0, 5.0, 9.0, 6.0, 8.0]
        assert table["error"].tolist() == ["boom", "", "", "", ""]
        strict = make_reward("remote", parse_params(remote_params(url, max_error_share=0.1, **FAST)))
        with pytest.raises(RewardError, match=rf"reward server {url} failed on 1 of 5 images \(20.0% > .*"
                                              r"max_error_share 10.0%\); first error: boom"):
            strict.score(IMAGES, records)
        default = make_reward("remote", parse_params(remote_params(url, **FAST)))  # reward.max_error_share: 1%
        assert default.max_error_share == 0.01
    nulls = lambda n: (200, {"scores": [None] + [0.5] * (n - 1)})  # a null score, no error text
    with answering(nulls) as (url, _):
        table = make_reward("remote", parse_params(remote_params(url, max_error_share=0.5, **FAST))).score(
            IMAGES[:2], RECORDS[:2])
    assert table["reward"].tolist() == [0.0, 0.5] and table["error"].tolist() == ["the server returned no score", ""]


@pytest.mark.parametrize("answer, message", [
    ({"scores": [1.0]}, r"'scores' has 1 entries for 2 images"),
    ({"scores": [1.0, "high"]}, r"'scores' holds 'high', which is no number"),
    ({"score": [1.0, 1.0]}, r"expected an object with 'scores'"),
    ({"scores": [1.0, 1.0], "parts": {"a": [1]}}, r"part 'a' is not a list of 2 values"),
    ({"scores": [1.0, 1.0], "errors": ["x"]}, r"'errors' is not a list of 2 entries"),
])
def test_a_wrong_answer_names_the_server(answer, message):
    with answering(lambda n: (200, answer)) as (url, seen):
        reward = make_reward("remote", parse_params(remote_params(url, **FAST)))
        with pytest.raises(RewardError, match=rf"reward server {url} answered with the wrong shape: {message}"):
            reward.score(IMAGES[:2], RECORDS[:2])
    [body] = seen
    assert body["version"] == 1 and body["prompts"] == ["a cat", "a dog"] and body["metadata"] == ["CAT", ""]
    assert len(body["images"]) == 2


def test_options_and_preflight(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    p = parse_params(remote_params("localhost:8000", token_env="NO_SUCH_TOKEN"))
    assert preflight.problems(p, tmp_path) == [
        ("rewards.options.remote: url 'localhost:8000' is not an http(s) URL with a host, e.g. "
         "http://127.0.0.1:8000/score"),
        ("rewards.options.remote: token_env: the environment variable NO_SUCH_TOKEN is not set: export the "
         "server's token")]
    assert preflight.problems(parse_params(remote_params("http://127.0.0.1:9/score")), tmp_path) == []  # not contacted
    with pytest.raises(RewardError, match="url is empty"):
        make_reward("remote", parse_params(remote_params("")))
    with pytest.raises(RewardError, match="'rewards.options.remote.headers'.*token_env"):
        make_reward("remote", parse_params(remote_params("http://x/score", headers={"Authorization": "Bearer 1"})))
    with pytest.raises(RewardError, match="'rewards.options.remote.retry'"):
        make_reward("remote", parse_params(remote_params("http://x/score", retry=3)))
    assert isinstance(make_reward("remote", parse_params(remote_params("https://scores.example:443/v1"))),
                      RemoteReward)


def test_the_reference_server_refuses_bad_requests(user_rewards):
    import urllib.error
    import urllib.request

    with reference(Brightness()) as url:
        health = json.loads(urllib.request.urlopen(url.replace("/score", "/health"), timeout=2).read())
        assert health == {"ok": True, "reward": "brightness", "version": 1}
        for body, message in ((b"{not json", "Expecting property name"),
                              (json.dumps({"version": 2, "images": [], "prompts": []}).encode(), "version 2"),
                              (json.dumps({"images": ["aGk="], "prompts": ["p"]}).encode(), "image 0 is not base64 PNG"),
                              (json.dumps({"images": [], "prompts": ["p"]}).encode(), "0 images, 1 prompts")):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=2)
            assert err.value.code == 400 and message in json.loads(err.value.read())["error"]
