"""Online KTO: rounds of sample (the live policy) -> judge -> label -> train, in one process.

  settings   OnlineSettings: config.online, validated
  prompts    the prompt files, the held-out split, each round's prompts
  labels     verdicts -> training examples (threshold, top/bottom-k, pairs): pure
  judging    pointwise judges from a spec string (module:function, reward-model:, http)
  http_judge the pointwise HTTP judge (YES/NO) on eval's client (kto_jax/eval/http_client.py)
  rounds     the round files in the workdir (samples, verdicts, labels as JSONL)
  report     per-round metrics (pass rate with its interval, KL, margins) and the plot
  runner     the rounds themselves: setup, resume, train, evaluate, checkpoint

docs/online.md is the user's guide.
"""
