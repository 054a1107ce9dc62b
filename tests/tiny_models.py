"""The tiny random models and tokenizers of the test suite, built here (no hub access).

Every test that needs a model or a tokenizer gets it from this module, mostly through the
session fixtures of tests/conftest.py (each directory is built once per pytest run):

- `tokenizer(kind)`: a byte-level BPE trained on `sentence`s (vocab 320), wrapped as a
  transformers fast tokenizer. Kinds (TOKENIZERS): "llama" (<pad> <s> </s>, no chat
  template: the trainer and online tests), "chat" (ChatML tokens and template, eos
  <|im_end|> as SmolLM2-Instruct's: sampling, eval, demo), "llama_chat" ("llama" plus the
  ChatML tokens and template, adding <s> like Llama does: the data tests), "gemma3" and
  "gemma2" (Gemma's special tokens and the -it checkpoints' chat templates).
  `word_tokenizer()` is a word-level one with known ids (the checkpoint tests).
- `write_model_dir(out, kind)`: that tokenizer and a random 2-layer Llama (hidden 32)
  saved with `save_pretrained`, which is what `--config.model.path` and `--model` read.
- `hf_model(config)`: a random float32 transformers model of any supported architecture,
  norms randomised too (the cases and their configs: tests/models/hf_tiny_models.py).
- `write_gemma_model_dir(out)`: a tiny Gemma 3 multimodal checkpoint with the "gemma3" tokenizer.
- `write_moe_model_dir(out)`: a tiny Qwen3-MoE (4 experts, top 2) with the "llama" tokenizer.
- `write_prompts`, `write_unpaired_feedback`, `write_gemma_feedback`: prompt and feedback files
  for the chat models.
"""

from __future__ import annotations

import dataclasses
import json
import random

WORDS = ("the cat dog sat ran on a mat log red blue big small happy sad tree house car "
         "road sun moon star sky good bad fast slow yes no what why how when where who").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json, text parts): BOS, then
# turns <start_of_turn>user|model ... <end_of_turn>; a system message has no turn of its own,
# its text opens the first user turn followed by a blank line.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
# Gemma 2's (google/gemma-2-*-it): the same turns, and a system message is refused.
GEMMA2_TEMPLATE = GEMMA3_TEMPLATE.replace(
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}",
    "{{ raise_exception('System role not supported') }}")
VOCAB_SIZE = 320
# the Llama every model directory holds: 2 layers, hidden 32, grouped-query attention
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    specials: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    unk: str | None = None
    chat_template: str | None = None
    add_bos: bool = False     # the post-processor puts bos before every text, as Llama's does
    additional: tuple[str, ...] = ()  # special tokens beyond bos/eos/pad/unk (turn markers)
    # the training corpus: `corpus_size` sentences of 3-12 WORDS ending in `suffix`, then `extra`
    corpus_size: int = 400
    suffix: str = " ?"
    extra: tuple[str, ...] = ()


TOKENIZERS = {
    "llama": TokenizerKind(("<pad>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<pad>"),
    "chat": TokenizerKind(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos="<|im_start|>",
                          eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>",
                          chat_template=CHATML),
    "llama_chat": TokenizerKind(("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"), bos="<s>",
                                eos="</s>", pad="<pad>", chat_template=CHATML, add_bos=True,
                                corpus_size=300, suffix="", extra=("user assistant system\n",) * 20),
    **{name: TokenizerKind(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                           eos="<eos>", pad="<pad>", unk="<pad>", chat_template=template,
                           additional=("<start_of_turn>", "<end_of_turn>"))
       for name, template in (("gemma3", GEMMA3_TEMPLATE), ("gemma2", GEMMA2_TEMPLATE))},
}


def tokenizer(kind: str = "llama"):
    """A fast tokenizer of TOKENIZERS[kind], trained on a fixed corpus (the same every call)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast
    spec = TOKENIZERS[kind]
    rng = random.Random(0)
    corpus = [sentence(rng, 3, 12) + spec.suffix for _ in range(spec.corpus_size)] + list(spec.extra)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=VOCAB_SIZE, min_frequency=1,
                            special_tokens=list(spec.specials))
    inner = bpe._tokenizer  # pylint: disable=protected-access
    if spec.add_bos:
        inner.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", special_tokens=[(spec.bos, spec.specials.index(spec.bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=spec.bos, eos_token=spec.eos,
                                  pad_token=spec.pad, unk_token=spec.unk,
                                  additional_special_tokens=list(spec.additional))
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    return tok


def write_model_dir(out_dir: str, kind: str = "llama", seed: int = 0) -> str:
    """An HF directory (config.json, model.safetensors, tokenizer files) of a random Llama
    and `tokenizer(kind)`; the chat model ties its embeddings, as SmolLM2 does. Returns it."""
    import torch
    import transformers
    tok = tokenizer(kind)
    tok.save_pretrained(out_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), tie_word_embeddings=kind == "chat", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **LLAMA)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def write_gemma_model_dir(out_dir: str, seed: int = 0) -> str:
    """A tiny random Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration: a 2-layer
    language model with a sliding window of 4, a 1-layer SigLIP tower) with the "gemma3"
    tokenizer; eos = <eos> and <end_of_turn>, as the -it checkpoints list them. Returns it."""
    import torch
    import transformers
    tok = tokenizer("gemma3")
    tok.save_pretrained(out_dir)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                pad_token_id=tok.pad_token_id)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, eos_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises Gemma's (1 + w) norms at w = 0; vary them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir


def write_moe_model_dir(out_dir: str, seed: int = 0) -> str:
    """A tiny random Qwen3-MoE (2 layers, 4 experts of width 32, top 2, its load-balancing
    loss at 0.01) with the "llama" tokenizer. Returns it."""
    import torch
    import transformers
    tok = tokenizer("llama")
    tok.save_pretrained(out_dir)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, router_aux_loss_coef=0.01, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **LLAMA)
    torch.manual_seed(seed)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def word_tokenizer():
    """A word-level tokenizer over 'w0'..'w251' plus <pad>/<s>/</s>/<unk>: 'wN' is id N + 4."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(252)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def hf_model(config, seed: int = 0):
    """A randomly initialised float32 transformers model of `config` (eager attention); norms
    and biases are randomised too, so no parameter is trivial."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def write_prompts(path: str, n: int, seed: int = 0, chat: bool = True) -> list:
    """`n` prompts {prompt, id}; with `chat`, every other one is a message list."""
    rng = random.Random(seed)
    prompts = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = sentence(rng, 2, 6) + " ?"
            prompt = [{"role": "user", "content": text}] if chat and i % 2 == 0 else text
            prompts.append(prompt)
            f.write(json.dumps({"prompt": prompt, "id": i}) + "\n")
    return prompts


def write_unpaired_feedback(path: str, n: int, seed: int = 0) -> None:
    """Conversational unpaired rows; every 3rd undesirable. Prompts repeat in pairs."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        prompt = None
        for i in range(n):
            if i % 2 == 0:
                prompt = [{"role": "user", "content": sentence(rng, 2, 6) + " ?"}]
            row = {"prompt": prompt,
                   "completion": [{"role": "assistant", "content": sentence(rng, 2, 8)}],
                   "label": bool(i % 3)}
            f.write(json.dumps(row) + "\n")


def write_gemma_feedback(path: str, n: int, seed: int = 0) -> list:
    """Conversational unpaired feedback, every other prompt opening with a system message."""
    rng = random.Random(seed)
    rows = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": sentence(rng, 2, 6) + " ?"}]
            if i % 2 == 0:
                prompt.insert(0, {"role": "system", "content": "answer in " + sentence(rng, 1, 3)})
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": sentence(rng, 2, 8)}],
                   "label": bool(i % 3)}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
    return rows


def write_nf4_model_dir(out_dir: str, seed: int = 0) -> str:
    """`write_model_dir`'s Llama ("llama" tokenizer) with hidden 64 and MLP 128: every
    projection's input a whole number of NF4 blocks of 64 (QLoRA tests). Returns it."""
    import torch
    import transformers
    tok = tokenizer("llama")
    tok.save_pretrained(out_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **{**LLAMA, "hidden_size": 64, "intermediate_size": 128})
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir
