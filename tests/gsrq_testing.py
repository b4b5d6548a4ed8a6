"""Test helpers shared by several test files (import as ``gsrq_testing``;
``conftest`` is ambiguous once tests/gpu has its own)."""

from __future__ import annotations


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
