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


def write_gemma_tokenizer(out_dir: str, seed: int = 0, template: str = GEMMA3_TEMPLATE):
    """A byte-level BPE tokenizer with Gemma's special tokens (<pad> <eos> <bos>
    <start_of_turn> <end_of_turn>) and chat `template`, saved to `out_dir`; returns it."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sentence(rng, 3, 12) + " ?" for _ in range(400)], vocab_size=300,
                            min_frequency=1,
                            special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<pad>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=template)
    tok.save_pretrained(out_dir)
    return tok


def write_tiny_gemma_chat_model(out_dir: str, seed: int = 0) -> str:
    """A tiny random Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration: a 2-layer
    language model with a sliding window of 4, a 1-layer SigLIP tower) with Gemma 3's
    tokenizer (`write_gemma_tokenizer`); eos = <eos> and <end_of_turn>, as the -it
    checkpoints list them."""
    import torch
    import transformers

    tok = write_gemma_tokenizer(out_dir, seed)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                eos_token_id=[tok.eos_token_id, end_of_turn], pad_token_id=tok.pad_token_id)
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, eos_token_id=[tok.eos_token_id, end_of_turn])
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initialises Gemma's (1 + w) norms at w = 0; vary them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir


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
