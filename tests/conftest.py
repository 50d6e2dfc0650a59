"""Tiny random models of each supported family, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=8
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **SMALL, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=8
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bert": lambda: transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
}


def build_family(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[name]()
    cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return cls.from_config(config).eval()


@pytest.fixture
def tiny_llama():
    return build_family("llama")


def random_ids(n=4, t=16, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=gen)


def save_tiny_lm(path, layers=2, hidden=64, intermediate=128, seed=0, dtype=None):
    """A small random Llama with lowbit's reference tokenizer, saved as a model directory."""
    from lowbit.models import resolve_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("reference-lm"))
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm_dir(tmp_path):
    return save_tiny_lm(tmp_path / "tiny-lm")
