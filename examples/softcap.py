"""Tanh soft-capping of the attention logits, causal: scores are squashed smoothly into (-cap, cap).

From: Gemma 2 (Gemma Team, 2024, "Gemma 2: Improving Open Language Models at a Practical Size",
``attn_logit_softcapping = 50``) and Grok-1 (cap 30); attention-gym's ``mods/softcapping.py``.
"""

import torch

import attnlang as al

NAME = "softcap"
VARIANT = al.compile(score="cap * tanh(score / cap)", mask="q_idx >= kv_idx", params={"cap": 30.0})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the cap is a compile-time parameter)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
