"""One client for OpenAI-compatible judges, under load: `kto-jax eval --judge http` (pairwise,
kto_jax/eval/judges.py) and `kto-jax online`'s pointwise judge (kto_jax/online/http_judge.py).

Each item is one POST to /chat/completions. Requests go out concurrently from a bounded
pool (`workers` in flight at most); each carries its request id in the X-Request-Id
header (and the body's metadata), and a reply that names another id is refused. A
request that times out, gets HTTP 408/409/425/429/5xx, a connection error, or a
malformed answer (one its `parse` rejects with `MalformedAnswer`) is retried with
exponential back-off and jitter, up to `retries` times. Answers are kept per request
id, so none is lost or counted twice however the retries interleave. When a request
runs out of retries the client stops sending new ones and raises `JudgeFailed`, which
carries every answer already received (an online run saves them before stopping).

Base URL, model and key come from the environment: KTO_JAX_JUDGE_BASE_URL (default
https://api.openai.com/v1), KTO_JAX_JUDGE_MODEL (or the spec's :MODEL), and
KTO_JAX_JUDGE_API_KEY or OPENAI_API_KEY.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence, TypeVar

from kto_jax.errors import UserError

T = TypeVar("T")
RETRYABLE_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class JudgeFailed(UserError):
    """The judge kept failing; `verdicts` holds the {index: answer} received before it did."""

    def __init__(self, message: str, verdicts: dict[int, Any]):
        super().__init__(message)
        self.verdicts = verdicts


class MalformedAnswer(Exception):
    """A reply the judge cannot read as a verdict (retried like a transient failure)."""


class RequestFailed(UserError):
    """One request gave up after `attempts` attempts (its last error is the message)."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


def chat(system: str, user: str) -> list[dict[str, str]]:
    """The messages of one judge request: a system and a user turn."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class ChatJudgeClient:
    """Answers of a chat-completions endpoint for many requests; see the module docstring.

    `ask(messages, parse)` returns `parse(reply text)` per request, in order. Subclasses
    (the pairwise and pointwise judges) build the messages and read the verdicts.
    """

    MODEL_HINT = "pass --judge http:MODEL"   # how a user names the model (error messages)

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 workers: int = 8, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 8.0, max_tokens: int = 5):
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.workers, self.timeout, self.retries = max(1, workers), timeout, retries
        self.backoff, self.max_backoff, self.max_tokens = backoff, max_backoff, max_tokens
        self.name = f"http:{model}@{self.base_url}"
        self.requests_sent = 0      # HTTP requests, retries included
        self.max_in_flight = 0      # most requests awaiting an answer at once (<= workers)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._calls = 0             # ask() calls: part of every request id

    @classmethod
    def from_env(cls, model: str | None = None, **kw: Any):
        """The client of the environment's endpoint (see the module docstring)."""
        model = model or os.environ.get("KTO_JAX_JUDGE_MODEL")
        if not model:
            raise UserError(f"the http judge needs a model: set KTO_JAX_JUDGE_MODEL (e.g. "
                            f"gpt-4o) or {cls.MODEL_HINT}")
        base = os.environ.get("KTO_JAX_JUDGE_BASE_URL", "https://api.openai.com/v1")
        key = os.environ.get("KTO_JAX_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return cls(base, model, key, **kw)

    def _request(self, request_id: str, messages: list[dict], parse: Callable[[str], T]) -> T:
        """One attempt: the parsed answer, or an exception saying why not."""
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "metadata": {"request_id": request_id}, "messages": messages}
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
        return parse(text)

    def _ask_one(self, request_id: str, messages: list[dict], parse: Callable[[str], T],
                 stop: threading.Event) -> T:
        """The answer to one request, retried with back-off; raises the last error when
        retries run out (or at once for a non-retryable HTTP status)."""
        rng = random.Random(request_id)
        for attempt in range(self.retries + 1):
            if stop.is_set():
                raise concurrent.futures.CancelledError()
            try:
                return self._request(request_id, messages, parse)
            except urllib.error.HTTPError as e:
                if e.code not in RETRYABLE_STATUS or attempt == self.retries:
                    raise RequestFailed(f"HTTP {e.code} {e.reason}", attempt + 1) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, MalformedAnswer) as e:
                if attempt == self.retries:
                    raise RequestFailed(f"{type(e).__name__}: {e}", attempt + 1) from None
            delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + rng.random())
            if stop.wait(delay):
                raise concurrent.futures.CancelledError()
        raise AssertionError("unreachable")

    def ask(self, requests: Sequence[list[dict]], parse: Callable[[str], T]) -> list[T]:
        """`parse(answer)` per request (a message list), in order; JudgeFailed when one
        request exhausts its retries (the answers received by then ride on the exception)."""
        with self._lock:
            self._calls += 1
            call = self._calls
        stop = threading.Event()
        answers: dict[int, T] = {}
        first_error: tuple[int, RequestFailed] | None = None
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self._ask_one, f"{call}-{i}", messages, parse, stop): i
                       for i, messages in enumerate(requests)}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                if future.cancelled():
                    continue
                try:
                    answer = future.result()
                except concurrent.futures.CancelledError:
                    continue
                except RequestFailed as e:
                    if first_error is None:
                        first_error = (index, e)
                        stop.set()
                        for other in futures:
                            other.cancel()
                    continue
                if index in answers:
                    raise AssertionError(f"two answers for request {call}-{index}")
                answers[index] = answer
        if first_error is not None:
            index, err = first_error
            times = "once" if err.attempts == 1 else f"{err.attempts} times"
            raise JudgeFailed(f"judge {self.name} keeps failing: request {call}-{index} failed "
                              f"{times} (last: {err}); {len(answers)} of "
                              f"{len(requests)} verdicts received", answers)
        return [answers[i] for i in range(len(requests))]
