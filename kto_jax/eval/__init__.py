"""Evaluation: implied-reward metrics on held-out feedback, judged winrates with CIs.

  stats            Wilson 90% intervals (the paper's binomial CIs)
  judges           rule/function, reward-model and OpenAI-compatible HTTP judges
  http_client      the HTTP judges' client (eval's and online's): bounded pool, retries, timeouts
  rewards          margins and reward accuracy through the train step's own forwards
  winrate          generations vs the dataset's SFT-target completions
  logprob_scoring  log pi(y|x) of given completions (KL estimates, LM judges)
  loading          --model: HF dir, .gguf file or a run's workdir
`kto-jax eval` (kto_jax/commands/eval.py) ties them together.
"""
