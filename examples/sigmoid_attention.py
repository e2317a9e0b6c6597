"""Activation attention without softmax's normalization: out = sum over allowed keys of f(score) * v, here with
f = sigmoid(score + bias) (bias = -log(kv_len), as in sigmoid attention), causal.

From: attention-gym's ``generate_activation_score_mod`` (``mods/activation.py``), which runs f through softmax as
``log(f(s) + offset)`` and undoes the normalization afterwards; Theory, Analysis, and Best Practices for Sigmoid
Self-Attention (Ramapuram et al., 2024). attnlang computes the numerator directly (``normalize=False``) with
score ``log(f(score))``; ReLU attention is ``log(max(score, 0.0))``. GELU attention has negative weights, which a
score (a log weight) cannot carry: it is not expressible this way (examples/activation.py computes it with
attention-gym's offset, ``log(gelu(score) + offset)``, and subtracts ``offset * sum(v)``).
"""

import torch

import attnlang as al

NAME = "sigmoid_attention"
VARIANT = al.compile(score="log(sigmoid(score - log(float(kv_len))))", mask="q_idx >= kv_idx", normalize=False)


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: sigmoid(score - log(kv_len)) weights, unnormalized, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
