"""Batched, jitted sampling with a KV cache, sharded on the mesh.

One jitted program per (batch, prompt length, sampling settings):
  1. prefill: the left-padded prompt batch [B, P] goes through the model in ONE
     forward (`Transformer.cached_hidden_states` at cache index 0), which writes its
     keys/values into a static-size cache of S = P + max_new_tokens slots (a
     sliding-window layer with W < S keeps a ring of its last W: kto_jax/models/kv_cache.py);
  2. decode: a `lax.while_loop`, one token per iteration for every row, until
     max_new_tokens or every row has emitted an end-of-sequence token.
Rows are independent: a row that has stopped keeps emitting `pad_id`.
Decoding rule per step: greedy (temperature 0), or temperature sampling after
top-k and top-p (nucleus) filtering.

Sharding: the batch axis of the prompts, the cache and the outputs is split over
the mesh axes of the 'batch' logical rule (config.mesh.rules: ('data', 'fsdp')),
the cache's kv-head axis over the 'kv_heads' rule; parameters stay where
`from_pretrained` put them. `Sampler` pads the batch to a multiple of the number
of batch shards and the prompt length to a multiple of `prompt_multiple`, so a
stream of prompt sets compiles a handful of programs.

Prompts are rendered exactly as the data pipeline renders training prompts
(kto_jax/data/tokenize.py): a message list through the tokenizer's chat template
with `add_generation_prompt=True`; a plain string as is, after the special
tokens the tokenizer puts before text (e.g. BOS). `chat=True` wraps plain strings
in one user message first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kto_jax.data.tokenize import prefix_ids
from kto_jax.errors import UserError
from kto_jax.models.kv_cache import KV_AXES, MASK_AXES, KVCache, init_kv_cache
from kto_jax.models.transformer import Transformer, positions_from_mask
from kto_jax.sharding import activation_sharding, batch_shards, logical_to_mesh, single_device_mesh

Array = jax.Array
Prompt = str | list  # plain text, or a list of {"role", "content"} messages

# Inference sharding (the training table of configs/base.py without fsdp): batch over the
# data axes, heads / mlp / vocab over 'tensor'; with tensor=1 the weights are replicated.
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"), ("vocab", "tensor"))


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen (hashable: a static argument of the jitted decoder)."""
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0: greedy (argmax); top_k/top_p are then ignored
    top_k: int = 0             # >0: sample among the k most likely tokens only
    top_p: float = 1.0         # <1: sample from the smallest set with probability mass >= top_p

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError(f"invalid sampling settings {self}: need temperature >= 0, "
                            "0 < top_p <= 1 and top_k >= 0")


@dataclasses.dataclass
class Generation:
    """One completion: its text (end-of-sequence token excluded) and token ids."""
    prompt: Prompt
    text: str
    token_ids: list[int]
    finished: bool      # True when the model emitted an end-of-sequence token
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the tokenized prompt
    stop_token: int | None = None  # the end-of-sequence id it emitted, if finished

    @property
    def scored_ids(self) -> list[int]:
        """The completion as the model produced it: token_ids plus the stop token, if any."""
        return self.token_ids + ([self.stop_token] if self.stop_token is not None else [])


# ---------------------------------------------------------------- pure math

def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """float32 [B, V] logits with tokens outside the top-k / top-p set at -inf.

    top-p keeps the most likely tokens whose cumulative probability, before each one,
    is below top_p (so the most likely token always survives).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def choose_tokens(logits: Array, key: Array, settings: SamplingSettings) -> Array:
    """int32 [B] next tokens from float32 [B, V] logits."""
    if settings.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _next_logits(model: Transformer, hidden: Array) -> Array:
    """float32 [B, V] logits of the last position of hidden [B, T, D] (soft-capped where the
    model caps its final logits)."""
    return model.logits(hidden[:, -1])


def decode(graphdef: nnx.GraphDef, params: Any, prompt_ids: Array, prompt_mask: Array,
           key: Array, *, settings: SamplingSettings, eos_ids: tuple[int, ...], pad_id: int,
           cache_sharding: KVCache | None = None,
           model_of: Callable[[Any, Any], Transformer] = nnx.merge) -> tuple[Array, Array]:
    """Prefill then a while-loop decode; pure, so it jits as is.

    Args:
      graphdef, params: the model is `model_of(graphdef, params)`: nnx.merge of an
        nnx.Param state, or e.g. a LoRA policy (kto_jax.step.adapters.model_of on a
        LoraGraph and LoraView(base, adapters)), whose adapters run beside the base
        weights without a merged copy of them.
      prompt_ids, prompt_mask: int32 [B, P], LEFT-padded (the last column is every
        row's last prompt token); a row with no real token is filler.
      key: PRNG key (unused when greedy).
    Returns:
      (tokens int32 [B, N], lengths int32 [B]): N = max_new_tokens generated tokens per
      row, `pad_id` after the first end-of-sequence token; lengths count the tokens up
      to and including that token (N when there is none).
    """
    model = model_of(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    n = settings.max_new_tokens
    cache = init_kv_cache(model.config, batch, prompt_len + n)  # sliding layers: a ring of W slots
    if cache_sharding is not None:
        cache = jax.tree.map(jax.lax.with_sharding_constraint, cache, cache_sharding)
    hidden, cache = model.cached_hidden_states(prompt_ids, positions_from_mask(prompt_mask),
                                               prompt_mask, cache, jnp.int32(0))
    next_position = prompt_mask.astype(jnp.int32).sum(-1)          # [B] position of new token 0
    eos = jnp.asarray(eos_ids, jnp.int32)
    key, sub = jax.random.split(key)
    first = choose_tokens(_next_logits(model, hidden), sub, settings)
    tokens = jnp.full((batch, n), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, done, key = carry
        last = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1)         # [B, 1]
        positions = (next_position + step - 1)[:, None]
        hidden, cache = model.cached_hidden_states(last, positions, jnp.ones_like(last), cache,
                                                   prompt_len + step - 1)
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad_id, choose_tokens(_next_logits(model, hidden), sub, settings))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new[:, None], step, axis=1)
        return step + 1, tokens, cache, done | jnp.isin(new, eos), key

    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, done, key))
    return tokens, generated_lengths(tokens, eos)


def generated_lengths(tokens: Array, eos: Array) -> Array:
    """int32 [B]: index of the first end-of-sequence token + 1, or N when there is none."""
    is_eos = jnp.isin(tokens, eos)
    first = jnp.argmax(is_eos, axis=1)
    return jnp.where(is_eos.any(axis=1), first + 1, tokens.shape[1]).astype(jnp.int32)


# ---------------------------------------------------------------- prompts

def render_prompt(tokenizer: Any, prompt: Prompt, chat: bool = False) -> str:
    """The prompt's text: message lists (and, with chat=True, strings) via the chat template."""
    if isinstance(prompt, str) and chat:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("a prompt is a message list (or --chat was given) but the tokenizer has no "
                        "chat template; pass plain-text prompts or a model whose tokenizer defines one")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt, as the data pipeline tokenizes training prompts."""
    prefix = prefix_ids(tokenizer)  # the pipeline's own rule for plain text
    out = []
    for prompt in prompts:
        templated = not isinstance(prompt, str) or chat
        ids = list(tokenizer(render_prompt(tokenizer, prompt, chat), add_special_tokens=False)["input_ids"])
        out.append(ids if templated else prefix + ids)
    return out


def left_pad(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 [batch, length] ids and mask, each row LEFT-padded; rows beyond len(rows) are filler."""
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        row = list(row)[-length:]
        if row:
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return ids, mask


def eos_token_ids(model_config: Any, tokenizer: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's (int or list), the tokenizer's, and `extra`."""
    ids = set(int(i) for i in extra)
    eos = model_config.eos_token_id
    ids.update([eos] if isinstance(eos, int) else list(eos or ()))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise UserError("the model and tokenizer define no end-of-sequence token; generation would "
                        "always run to max_new_tokens (pass a stop token id)")
    return tuple(sorted(ids))


# ---------------------------------------------------------------- the sampler

class Sampler:
    """Generates completions from a kto-jax Transformer for lists of prompts.

        sampler = Sampler(model, tokenizer, mesh=mesh, rules=config.mesh.rules)
        gens = sampler.generate(prompts, SamplingSettings(max_new_tokens=64), seed=0)
        sampler.set_params(new_params)   # e.g. the trained policy; no recompilation

    Prompts are processed in batches of `batch_size` rows (rounded up to a multiple of
    the batch shards), prompt lengths padded up to a multiple of `prompt_multiple`.
    """

    def __init__(self, model: Transformer, tokenizer: Any, *, mesh: Mesh | None = None,
                 rules: Any = DEFAULT_RULES, batch_size: int = 16, prompt_multiple: int = 32,
                 chat: bool = False, stop_token_ids: Sequence[int] = ()):
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.config = model.config
        self.tokenizer, self.chat = tokenizer, chat
        self.mesh = mesh if mesh is not None else single_device_mesh()
        shards = batch_shards(self.mesh, rules)
        self.batch_size = -(-max(batch_size, 1) // shards) * shards
        self.prompt_multiple = prompt_multiple
        self.eos_ids = eos_token_ids(model.config, tokenizer, stop_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._rules = rules
        self._model_of: Callable[[Any, Any], Transformer] = nnx.merge
        self._decoders: dict[tuple, Any] = {}

    def set_params(self, params: Any, graphdef: Any = None,
                   model_of: Callable[[Any, Any], Transformer] | None = None) -> None:
        """Sample from other weights of the same architecture: an nnx.Param state, or with
        `graphdef` and `model_of` any split of the model that `model_of(graphdef, params)`
        rebuilds inside the jitted decode (e.g. a LoRA policy, base + adapters, with
        kto_jax.step.adapters.model_of: no merged copy of the weights). A new graphdef
        compiles new decoders; new params of the same one do not."""
        self.params = params
        if graphdef is not None and graphdef is not self.graphdef:
            self.graphdef, self._decoders = graphdef, {}
        if model_of is not None and model_of is not self._model_of:
            self._model_of, self._decoders = model_of, {}

    def _sharding(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_mesh(axes, self._rules, shape, self.mesh))

    def _decoder(self, settings: SamplingSettings, prompt_len: int):
        """(jitted decode for this shape and settings, the prompt arrays' sharding)."""
        key = (settings, prompt_len)
        if key not in self._decoders:
            c, b = self.config, self.batch_size
            slots = prompt_len + settings.max_new_tokens
            shapes = jax.eval_shape(functools.partial(init_kv_cache, c, b, slots))
            cache = jax.tree.map(lambda x: self._sharding(KV_AXES if x.ndim == 5 else MASK_AXES, x.shape),
                                 shapes)
            rows = self._sharding(("batch", "length"), (b, prompt_len))
            fn = functools.partial(decode, self.graphdef, settings=settings, eos_ids=self.eos_ids,
                                   pad_id=self.pad_id, cache_sharding=cache,
                                   model_of=self._model_of)
            out = (self._sharding(("batch", "length"), (b, settings.max_new_tokens)),
                   self._sharding(("batch",), (b,)))
            fn = activation_sharding(fn, self.mesh, self._rules)  # activations follow the rules
            self._decoders[key] = (jax.jit(fn, out_shardings=out), rows)
        return self._decoders[key]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None
                     ) -> list[tuple[list[int], int | None]]:
        """(completion ids without the end token, the end token or None) per tokenized prompt.

        `progress(done, total)` is called after each batch.
        """
        out: list[tuple[list[int], int | None]] = []
        key = jax.random.key(seed)
        for start in range(0, len(prompt_ids), self.batch_size):
            rows = prompt_ids[start:start + self.batch_size]
            longest = max(len(r) for r in rows)
            length = -(-max(longest, 1) // self.prompt_multiple) * self.prompt_multiple
            fn, sharding = self._decoder(settings, length)
            ids, mask = left_pad(rows, length, self.batch_size, self.pad_id)
            ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
            tokens, lengths = jax.device_get(fn(self.params, ids, mask, jax.random.fold_in(key, start)))
            for i in range(len(rows)):
                seq = tokens[i, :lengths[i]].tolist()
                finished = bool(seq) and seq[-1] in self.eos_ids
                out.append((seq[:-1], seq[-1]) if finished else (seq, None))
            if progress is not None:
                progress(len(out), len(prompt_ids))
        return out

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        """One completion per prompt (strings or message lists), in order."""
        encoded = encode_prompts(self.tokenizer, prompts, self.chat)
        results = self.generate_ids(encoded, settings, seed, progress)
        return [Generation(prompt, self.tokenizer.decode(ids, skip_special_tokens=True), ids,
                           stop is not None, prompt_ids, stop)
                for prompt, prompt_ids, (ids, stop) in zip(prompts, encoded, results)]
