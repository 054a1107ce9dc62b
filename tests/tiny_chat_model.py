"""A tiny random chat model for generation / eval / demo tests (no hub access).

`write_tiny_chat_model(dir)` saves an HF directory: a byte-level BPE tokenizer
trained here on a small word list (vocab < 512) with ChatML special tokens and a
ChatML chat template, and a random 2-layer Llama (hidden 32) whose eos is
<|im_end|>, as SmolLM2-Instruct's is. Also a few judge functions importable as
`tiny_chat_model:NAME` (this directory is on sys.path under pytest).
"""

from __future__ import annotations

import json
import random

WORDS = ("the cat dog sat ran on a mat log red blue big small happy sad tree house car road "
         "sun moon star sky good bad fast slow yes no what why how when where who is are").split()
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tiny_chat_model(out_dir: str, seed: int = 0, hidden: int = 32) -> str:
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sentence(rng, 3, 12) + " ?" for _ in range(400)], vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)
    tok.save_pretrained(out_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def write_prompts(path: str, n: int, seed: int = 0, chat: bool = True) -> list:
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


# ---- judges importable as tiny_chat_model:NAME ----

def word_count_score(prompt: str, completion: str) -> float:
    """Pointwise: fewer words is better."""
    return -len(completion.split())


def longer_wins(prompt: str, candidate: str, reference: str) -> float:
    """Pairwise: the longer text wins; equal lengths tie."""
    return 1.0 if len(candidate) > len(reference) else 0.0 if len(candidate) < len(reference) else 0.5
