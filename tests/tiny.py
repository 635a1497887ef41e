"""Tiny random-weight models of every supported family, saved as real HF folders (no download).

The tokenizer is a byte-level BPE trained here on a small corpus, with ChatML special tokens, so the
engine's own loading, chat-template and detokenisation paths are exercised end to end.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CORPUS = """
The architect writes a specification. The developer writes code from the specification, and the
reviewer reads both the specification and the code. A fox jumps over the lazy dog near the river.
Multi-agent applications pass one model's output into the next prompt. def add(a, b): return a + b
The cache keeps keys and values for every token; rotary position embeddings rotate the keys.
Numbers like 12, 345 and 6789 appear in text. Questions end with a question mark? Yes, they do!
""" * 4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               max_position_embeddings=2048, tie_word_embeddings=False)

FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **_COMMON)),
    "mistral": (MistralForCausalLM,
                lambda: MistralConfig(num_hidden_layers=3, num_key_value_heads=2, sliding_window=24, **_COMMON)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, **_COMMON)),
    "qwen3": (Qwen3ForCausalLM,
              lambda: Qwen3Config(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, **_COMMON)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        num_hidden_layers=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **_COMMON)),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])


def make_model(family: str, folder: Path, seed: int = 0, on_grid: bool = False, **config_overrides) -> Path:
    """Save a random tiny `family` model plus tokenizer in `folder` and return it. on_grid: every matrix
    dequantised from an int8 grid of group 32 (`relay_llm.grid.quantize`), as a model converted from a
    Q8_0 GGUF is."""
    cls, make_config = FAMILIES[family]
    config = make_config()
    for k, v in config_overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random weights with enough spread to make outputs position-sensitive
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        model.lm_head.weight[: len(SPECIALS)] = 0  # special tokens (EOS, end of turn) stay unlikely
        if on_grid:
            from relay_llm.grid import quantize

            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(quantize(p, 32).dequantised())
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
