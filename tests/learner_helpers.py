"""Builders shared by the learner tests: a tiny random model directory and synthetic trajectories.

A tiny model of the bundled model's architecture (Llama) keeps learner tests at seconds where the
real weights do not matter (packing, resume, LoRA bookkeeping); tests about learning direction use
the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowlane.trainer.synthetic import synthetic_trajectories

__all__ = ["TINY_VOCAB", "make_tiny_model_dir", "synthetic_trajectories"]

TINY_VOCAB = 128


def make_tiny_model_dir(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A randomly initialised 2-layer Llama with a tied embedding, saved in HF layout at ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path
