"""gpt-oss attention: a causal sliding window of 128 keys with a learned sink logit per head.

From: OpenAI, 2025, "gpt-oss-120b & gpt-oss-20b Model Card" (layers alternate between a banded window of 128
tokens and dense attention; every head learns a bias in the softmax's denominator, its attention sink), as in
transformers' ``GptOssAttention`` (``s_aux``). The sink is one extra key per row with logit ``sinks[h]`` that
carries no value (LANGUAGE.md), so a head can put weight on nothing; unlike examples/attention_sinks.py
(StreamingLLM, which keeps the first tokens visible) it adds no key positions. ``sinks``: float32 [H].
"""

import torch

import attnlang as al

NAME = "gpt_oss"
VARIANT = al.compile(mask="q_idx >= kv_idx & q_idx - kv_idx < window", params={"window": 128}, sink="sinks[h]")


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``sinks``: float32 [q_heads], the learned sink logit of each query head (here spread over [-1, 2])."""
    return {"sinks": torch.linspace(-1.0, 2.0, q_heads, device=device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
