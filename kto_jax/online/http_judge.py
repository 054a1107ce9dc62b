"""The HTTP judge of online rounds: one pointwise verdict per sample, under load.

Each sample is one POST to an OpenAI-compatible /chat/completions endpoint asking
whether the response is good ("YES" or "NO"; a bare number in [0, 1] is taken as a
score). Requests go out concurrently from a bounded pool (`workers` in flight at
most); each carries its request id in the X-Request-Id header (and the body's
metadata), and a reply that names another id is refused. A request that times out,
gets HTTP 408/429/5xx, a connection error, or a malformed answer is retried with
exponential back-off, up to `retries` times. Verdicts are kept per request id, so
none is lost or counted twice however the retries interleave. When a request runs
out of retries the judge stops sending new ones and raises `JudgeFailed`, which
carries every verdict already received (the runner saves them before stopping).

Base URL, model and key come from the environment as for `kto-jax eval --judge http`
(KTO_JAX_JUDGE_BASE_URL, KTO_JAX_JUDGE_MODEL, KTO_JAX_JUDGE_API_KEY / OPENAI_API_KEY).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import threading
import urllib.error
import urllib.request
from typing import Sequence

from kto_jax.errors import UserError

RETRYABLE_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)

POINTWISE_SYSTEM = ("You are a careful evaluator of AI assistant responses. Decide whether the "
                    "response is helpful, harmless and concise for the user's request.")
POINTWISE_TEMPLATE = """[User request]
{prompt}

[Response]
{completion}

Is this a good response? Answer with exactly one word: YES or NO."""


class JudgeFailed(UserError):
    """The judge kept failing; `verdicts` holds the {index: score} received before it did."""

    def __init__(self, message: str, verdicts: dict[int, float]):
        super().__init__(message)
        self.verdicts = verdicts


class MalformedAnswer(Exception):
    """A reply the judge cannot read as a verdict (retried like a transient failure)."""


def parse_verdict(text: str) -> float:
    """1.0 for YES, 0.0 for NO, a bare number in [0, 1] as it is; MalformedAnswer otherwise."""
    word = text.strip().strip(".*\"'` ").split()
    if not word:
        raise MalformedAnswer("empty answer")
    head = word[0].strip(".,:;!*\"'`").upper()
    if head in ("YES", "GOOD", "PASS"):
        return 1.0
    if head in ("NO", "BAD", "FAIL"):
        return 0.0
    if re.fullmatch(r"[01](\.\d+)?", head) and 0.0 <= float(head) <= 1.0:
        return float(head)
    raise MalformedAnswer(f"answer {text[:80]!r} is neither YES nor NO")


class HTTPPointwiseJudge:
    """Pointwise verdicts from a chat-completions endpoint; see the module docstring."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 workers: int = 8, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 8.0):
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.workers, self.timeout, self.retries = max(1, workers), timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.name = f"http:{model}@{self.base_url}"
        self.requests_sent = 0      # HTTP requests, retries included
        self.max_in_flight = 0      # most requests awaiting an answer at once (<= workers)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._calls = 0             # scores() calls: part of every request id

    @classmethod
    def from_env(cls, model: str | None = None, **kw) -> "HTTPPointwiseJudge":
        model = model or os.environ.get("KTO_JAX_JUDGE_MODEL")
        if not model:
            raise UserError("the http judge needs a model: set KTO_JAX_JUDGE_MODEL or use "
                            "--config.online.judge=http:MODEL")
        base = os.environ.get("KTO_JAX_JUDGE_BASE_URL", "https://api.openai.com/v1")
        key = os.environ.get("KTO_JAX_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return cls(base, model, key, **kw)

    def _request(self, request_id: str, prompt: str, completion: str) -> float:
        """One attempt: the verdict, or an exception saying why not."""
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "temperature": 0, "max_tokens": 5,
                "metadata": {"request_id": request_id}, "messages": [
                    {"role": "system", "content": POINTWISE_SYSTEM},
                    {"role": "user", "content": POINTWISE_TEMPLATE.format(
                        prompt=prompt, completion=completion)}]}
        request = urllib.request.Request(f"{self.base_url}/chat/completions", method="POST",
                                         data=json.dumps(body).encode("utf-8"), headers=headers)
        with self._lock:
            self.requests_sent += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        finally:
            with self._lock:
                self._in_flight -= 1
        try:
            reply = json.loads(raw.decode("utf-8"))
            text = reply["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise MalformedAnswer(f"no choices[0].message.content in {raw[:120]!r}") from e
        echoed = reply.get("request_id") if isinstance(reply, dict) else None
        if echoed is not None and echoed != request_id:
            raise MalformedAnswer(f"reply for request {echoed!r}, expected {request_id!r}")
        return parse_verdict(text)

    def _judge_one(self, request_id: str, prompt: str, completion: str,
                   stop: threading.Event) -> float:
        """The verdict of one sample, retried with back-off; raises the last error when
        retries run out (or at once for a non-retryable HTTP status)."""
        rng = random.Random(request_id)
        for attempt in range(self.retries + 1):
            if stop.is_set():
                raise concurrent.futures.CancelledError()
            try:
                return self._request(request_id, prompt, completion)
            except urllib.error.HTTPError as e:
                if e.code not in RETRYABLE_STATUS or attempt == self.retries:
                    raise UserError(f"HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, MalformedAnswer) as e:
                if attempt == self.retries:
                    raise UserError(f"{type(e).__name__}: {e}") from None
            delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + rng.random())
            if stop.wait(delay):
                raise concurrent.futures.CancelledError()
        raise AssertionError("unreachable")

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One verdict per (prompt, completion), in order; JudgeFailed when one request
        exhausts its retries (the verdicts received by then ride on the exception)."""
        with self._lock:
            self._calls += 1
            call = self._calls
        stop = threading.Event()
        verdicts: dict[int, float] = {}
        first_error: tuple[int, BaseException] | None = None
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self._judge_one, f"{call}-{i}", p, c, stop): i
                       for i, (p, c) in enumerate(zip(prompts, completions))}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                if future.cancelled():
                    continue
                try:
                    score = future.result()
                except concurrent.futures.CancelledError:
                    continue
                except UserError as e:
                    if first_error is None:
                        first_error = (index, e)
                        stop.set()
                        for other in futures:
                            other.cancel()
                    continue
                if index in verdicts:
                    raise AssertionError(f"two verdicts for request {call}-{index}")
                verdicts[index] = score
        if first_error is not None:
            index, err = first_error
            raise JudgeFailed(f"judge {self.name} keeps failing: request {call}-{index} failed "
                              f"{self.retries + 1} times (last: {err}); {len(verdicts)} of "
                              f"{len(prompts)} verdicts received", verdicts)
        return [verdicts[i] for i in range(len(prompts))]
