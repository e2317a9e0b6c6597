"""Multi-head latent attention (MLA), its decoupled RoPE term: the score of the compressed (latent) heads gains
``rope_scale`` times the dot product of per-head rotary query features and rotary key features shared by all heads.

From: DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model (DeepSeek-AI, 2024);
attention-gym's ``generate_mla_rope_score_mod`` (``mods/latent_attention.py``). The dot product over the
``rope`` rotary dimensions is one bounded reduction: ``sum(q_rope[b, h, q_idx, i] * k_rope[b, kv_idx, i] for i in
range(rope))``.
"""

import torch

import attnlang as al

NAME = "mla_rope_bias"
ROPE, SCALE = 8, 0.5
VARIANT = al.compile(
    score="score + rope_scale * sum(q_rope[b, h, q_idx, i] * k_rope[b, kv_idx, i] for i in range(rope))",
    params={"rope": ROPE, "rope_scale": SCALE})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """q_rope: float32 [batch, q_heads, q_len, ROPE]; k_rope: float32 [batch, kv_len, ROPE] (one rotary key per
    position, shared by every head)."""
    g = torch.Generator().manual_seed(0)
    return {"q_rope": torch.randn(batch, q_heads, q_len, ROPE, generator=g).to(device),
            "k_rope": torch.randn(batch, kv_len, ROPE, generator=g).to(device)}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(2, 4, n, 64) for _ in range(3))
    named = tensors(2, 4, n, n)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {ROPE} rotary dims, scale {SCALE}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
