"""Chat rendering: the tokenizer's own template, or a fallback for models that ship none."""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")

# Gemma 3 turn format (the packaged base model ships no template). Roles keep their own turn name,
# except assistant, which Gemma calls "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Token texts that end a chat turn, besides the tokenizer's EOS.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def validate_messages(messages) -> list[dict]:
    """Check `messages` is a non-empty list of {"role", "content"} dicts with known roles."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({**m, "content": content})
    return out


def ensure_template(tokenizer, model_type: str) -> None:
    """Give `tokenizer` a chat template if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA_TEMPLATE if model_type.startswith("gemma") else CHATML_TEMPLATE


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """EOS ids: the generation config's, the tokenizer's, and known end-of-turn tokens in the vocab."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids
