"""Judges: Python rules, reward models (torch classifier, JAX causal LM), and an
OpenAI-compatible HTTP endpoint served by a local stdlib server on 127.0.0.1."""

import http.server
import json
import os
import threading

import numpy as np
import pytest

from kto_jax.errors import UserError
from kto_jax.eval import judges

PROMPTS = ["why is the sky blue ?", "what is a cat ?", "who ran ?"]
CANDIDATES = ["because of light", "a small happy animal that sat on a mat", "the dog"]
REFERENCES = ["light scatters off the air so blue", "an animal", "the dog"]


def test_function_judges_pointwise_and_pairwise():
    score = judges.make_judge("tiny_judges:word_count_score")   # fewer words wins
    assert isinstance(score, judges.ScoreJudge)
    assert score.compare(PROMPTS, CANDIDATES, REFERENCES) == [1.0, 0.0, 0.5]
    pairwise = judges.make_judge("tiny_judges:longer_wins")
    assert isinstance(pairwise, judges.PairwiseFunctionJudge)
    assert pairwise.compare(PROMPTS, CANDIDATES, REFERENCES) == [0.0, 1.0, 0.5]
    with pytest.raises(UserError, match="cannot import"):
        judges.make_judge("no_such_module_xyz:f")
    with pytest.raises(UserError, match="no function"):
        judges.make_judge("tiny_judges:nothing_here")
    with pytest.raises(UserError, match="unknown judge"):
        judges.make_judge("gpt4")


def test_prompt_text_flattens_messages():
    assert judges.prompt_text("hi") == "hi"
    assert judges.prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) \
        == "system: s\nuser: u"


# ---------------------------------------------------------------- HTTP judge

class _JudgeServer(http.server.BaseHTTPRequestHandler):
    """Prefers the response containing 'light'; answers TIE when neither or both do."""
    requests: list = []
    max_requests = 50
    fail_first = 0
    answer = None          # a fixed answer instead of the verdict

    def do_POST(self):  # noqa: N802 (stdlib name)
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        assert len(cls.requests) <= cls.max_requests, "client sent too many requests"
        if cls.fail_first > 0:
            cls.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        a = text.split("[Response A]")[1].split("[Response B]")[0]
        b = text.split("[Response B]")[1].split("Which response")[0]
        verdict = "TIE" if ("light" in a) == ("light" in b) else ("A" if "light" in a else "B.")
        verdict = cls.answer if cls.answer is not None else verdict
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server(monkeypatch):
    _JudgeServer.requests = []
    _JudgeServer.fail_first = 0
    _JudgeServer.answer = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("KTO_JAX_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("KTO_JAX_JUDGE_MODEL", "local-judge")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    monkeypatch.delenv("KTO_JAX_JUDGE_API_KEY", raising=False)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_judge_against_local_server(judge_server):
    judge = judges.make_judge("http")
    assert isinstance(judge, judges.HTTPJudge)
    n = 12
    light = [i % 4 in (0, 2) for i in range(n)]          # candidate mentions light
    ref_light = [i % 4 in (2, 3) for i in range(n)]      # reference mentions light
    candidates = [f"candidate {i}" + (" light" if l else "") for i, l in enumerate(light)]
    references = [f"reference {i}" + (" light" if l else "") for i, l in enumerate(ref_light)]
    expected = [0.5 if a == b else 1.0 if a else 0.0 for a, b in zip(light, ref_light)]
    assert judge.compare(["why ?"] * n, candidates, references) == expected
    reqs = _JudgeServer.requests
    assert len(reqs) == n                                 # one request per item, no more
    assert all(r["path"] == "/v1/chat/completions" for r in reqs)
    assert all(r["auth"] == "Bearer sk-test-123" for r in reqs)
    assert {r["body"]["model"] for r in reqs} == {"local-judge"}
    # Position-bias control: the candidate is Response A for some items, B for others.
    shown_first = sum("[Response A]\ncandidate" in r["body"]["messages"][-1]["content"] for r in reqs)
    assert 0 < shown_first < n


def test_http_judge_retries_then_succeeds_and_reports_errors(judge_server, monkeypatch):
    _JudgeServer.fail_first = 2
    judge = judges.HTTPJudge.from_env(max_retries=3, workers=1, backoff=0.001)
    assert judge.compare(["p"], ["light"], ["dark"]) == [1.0]
    assert len(_JudgeServer.requests) == 3                # two 503s, then the answer
    assert judge.requests_sent == 3 and judge.max_in_flight == 1
    _JudgeServer.requests = []
    _JudgeServer.fail_first = 10
    with pytest.raises(UserError, match="failed 2 times .last: HTTP 503"):
        judges.HTTPJudge.from_env(max_retries=1, workers=1, backoff=0.001).compare(
            ["p"], ["a"], ["b"])
    assert len(_JudgeServer.requests) == 2                # bounded: 1 try + 1 retry
    # an answer that is no verdict is a tie, counted, and not retried
    _JudgeServer.requests, _JudgeServer.fail_first, _JudgeServer.answer = [], 0, "Maybe both"
    judge = judges.HTTPJudge.from_env(workers=2)
    assert judge.compare(["p", "q"], ["light", "a"], ["dark", "b"]) == [0.5, 0.5]
    assert judge.invalid_answers == 2 and len(_JudgeServer.requests) == 2
    monkeypatch.delenv("KTO_JAX_JUDGE_MODEL")
    with pytest.raises(UserError, match="KTO_JAX_JUDGE_MODEL"):
        judges.make_judge("http")
    assert judges.make_judge("http:other").model == "other"


# ---------------------------------------------------------------- reward models

def test_sequence_classifier_reward_model(tiny_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import shutil

    import transformers
    d = shutil.copytree(tiny_dir, str(tmp_path / "rm"))  # its tokenizer and config, a new head below
    tok = transformers.AutoTokenizer.from_pretrained(d)
    cfg = transformers.AutoConfig.from_pretrained(d)
    cfg.num_labels = 1
    cfg.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(1)
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(d)
    judge = judges.make_judge(f"reward-model:{d}")
    scores = judge.scores(PROMPTS, CANDIDATES)
    expected = []
    for p, c in zip(PROMPTS, CANDIDATES):   # one at a time: no padding involved
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                       tokenize=False)
        with torch.no_grad():
            expected.append(float(rm(**tok(text, return_tensors="pt")).logits[0, 0]))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    out = judge.compare(PROMPTS, CANDIDATES, REFERENCES)
    ref_scores = judge.scores(PROMPTS, REFERENCES)
    assert out == [judges.outcome_of_scores(c, r) for c, r in zip(scores, ref_scores)]


def test_causal_lm_reward_model_is_mean_token_logprob(tiny_dir, tmp_path):
    pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    from kto_jax.models import from_pretrained, load_tokenizer
    d = tiny_dir
    judge = judges.make_judge(f"reward-model:{d}")
    scores = judge.scores(PROMPTS[:2], CANDIDATES[:2])
    model, _ = from_pretrained(d)
    tok = load_tokenizer(d)
    for p, c, s in zip(PROMPTS[:2], CANDIDATES[:2], scores):
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True)
        x = tok(prompt, add_special_tokens=False)["input_ids"]
        y = tok(c, add_special_tokens=False)["input_ids"]
        ids = jnp.asarray([x + y])
        logits = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
        logp = jax.nn.log_softmax(logits[0], -1)
        token_logps = [float(logp[len(x) + j - 1, t]) for j, t in enumerate(y)]
        assert s == pytest.approx(np.mean(token_logps), abs=1e-4)
    with pytest.raises(UserError, match="config.json"):
        judges.make_judge(f"reward-model:{tmp_path}")
