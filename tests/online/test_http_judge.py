"""The online HTTP judge under load, against a local server (127.0.0.1, a thread) that
is slow, fails, hangs past the timeout and answers malformed, garbled or mismatched
replies: every verdict arrives once, matched to its request, with bounded concurrency,
bounded requests and bounded time; a judge that keeps failing raises a clear error
carrying the verdicts it did receive."""

import time
import zlib

import pytest

from judge_server import JudgeServer, verdict_of
from kto_jax.online.http_judge import HTTPPointwiseJudge, JudgeFailed, parse_verdict

N = 60
FAULTS = ("ok", "slow", "error", "malformed", "garbled", "wrong_id", "hang")


def _item(i: int) -> tuple[str, str]:
    return f"question {i} ?", ("a good answer" if i % 3 else "a poor answer") + f" number {i}"


def _flaky(request_id: str, attempt: int) -> str:
    """Each request's first two attempts draw a fault from its id; later ones are slow but fine."""
    if attempt >= 2:
        return "slow"
    return FAULTS[zlib.crc32(f"{request_id}/{attempt}".encode()) % len(FAULTS)]


def _judge(url: str, **kw) -> HTTPPointwiseJudge:
    kw = dict(dict(workers=4, timeout=0.4, retries=3, backoff=0.01, max_backoff=0.05), **kw)
    return HTTPPointwiseJudge(url, "test-judge", None, **kw)


def test_parse_verdict():
    assert [parse_verdict(t) for t in ("YES", " no.", "**Yes**", "0.25")] == [1.0, 0.0, 1.0, 0.25]
    for bad in ("", "maybe", "2", "A"):
        with pytest.raises(Exception, match="answer|empty"):
            parse_verdict(bad)


def test_every_verdict_once_and_matched_under_faults():
    prompts, completions = zip(*(_item(i) for i in range(N)))
    with JudgeServer(_flaky, slow_s=0.02, hang_s=0.8) as server:
        judge = _judge(server.url)
        start = time.perf_counter()
        scores = judge.scores(prompts, completions)
        elapsed = time.perf_counter() - start
        # faults really happened, and every request id got exactly one good answer
        hit = {f: sum(_flaky(rid, a) == f for rid, n in server.attempts.items() for a in range(n))
               for f in FAULTS}
        assert min(hit.values()) > 0, hit
        assert sorted(server.answered) == sorted(f"1-{i}" for i in range(N))
        assert set(server.answered.values()) == {1}
        assert judge.max_in_flight <= 4
        # the server may still sleep on requests the client gave up on (timed out)
        assert server.max_in_flight <= 4 + hit["hang"]
        assert sum(server.attempts.values()) == judge.requests_sent <= N * 4
    assert scores == [1.0 if verdict_of(c) == "YES" else 0.0 for c in completions]
    # bounded time: 60 items over 4 workers, each at most 4 attempts of <= 0.4 s + back-off
    assert elapsed < 30


def test_a_judge_that_keeps_failing_stops_with_the_verdicts_it_got():
    prompts, completions = zip(*(_item(i) for i in range(20)))

    def faults(request_id, attempt):  # odd requests always fail
        return "error" if int(request_id.split("-")[1]) % 2 else "ok"

    with JudgeServer(faults) as server:
        judge = _judge(server.url, workers=2, retries=2)
        start = time.perf_counter()
        # an odd request: which one exhausts its retries first depends on the 2 workers' timing
        with pytest.raises(JudgeFailed, match=r"keeps failing: request 1-\d*[13579] failed 3 times") as err:
            judge.scores(prompts, completions)
        assert time.perf_counter() - start < 10
        attempts = sum(server.attempts.values())
    got = err.value.verdicts
    assert got and all(i % 2 == 0 for i in got)           # only answered requests, none twice
    assert all(got[i] == (1.0 if i % 3 else 0.0) for i in got)
    assert attempts < 20 * 3                               # it stopped sending
