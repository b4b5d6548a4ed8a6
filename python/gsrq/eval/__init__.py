"""Evaluation of KV-cache methods: perplexity with fake quantization
(:mod:`~gsrq.eval.ppl`), reconstruction metrics (:mod:`~gsrq.eval.recon`),
LongBench (:mod:`~gsrq.eval.longbench`), the KIVI 2-bit baseline
(:mod:`~gsrq.eval.kivi`), method specs and codebook caching
(:mod:`~gsrq.eval.methods`), plots and the ``gsrq eval`` command line
(:mod:`~gsrq.eval.cli`). Submodules import torch/transformers; import them
directly.
"""
