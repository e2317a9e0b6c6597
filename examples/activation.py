"""Activation attention: softmax replaced by a pointwise activation f, unnormalized, here ReLU and causal:
out[i] = sum over allowed keys j of relu(score[i, j]) * v[j] (score = q.k / sqrt(head_dim)).

From: attention-gym's ``generate_activation_score_mod`` (``mods/activation.py``), which runs f through softmax as
``log(f(s) + offset)`` and undoes the normalization with lse afterwards (``undo_softmax``); ReLU attention as in
Wortsman et al., 2023, "Replacing softmax with ReLU in Vision Transformers" (which also divides by the sequence
length: add ``- log(float(kv_len))`` to the score); sigmoid attention is examples/sigmoid_attention.py.

attnlang computes the numerator directly: with ``normalize=False`` a variant returns ``sum exp(s') v`` over the
allowed keys, so the score is ``s' = log(f(score))``. For ReLU, ``log(max(score, 0.0))`` is -inf where the score
is <= 0: a zero weight, like a masked pair. For sigmoid, ``log(sigmoid(score))`` is finite everywhere.

GELU cannot be written this way: its weights are negative for negative scores (down to about -0.17), and a weight
``exp(s')`` never is; ``log(gelu(score))`` is NaN there, which a call refuses with an AttnLangError. attention-gym's
own offset trick works instead: ``GELU_PLUS_OFFSET`` is ``log(gelu(score) + offset)`` with ``normalize=False``,
and ``gelu_attention`` subtracts ``offset * sum of v over the allowed keys`` (that sum is the variant ``V_SUM``,
the score ``0.0`` unnormalized), so the result is exact GELU (``erf``) attention up to rounding.
"""

import torch

import attnlang as al

NAME = "activation"
VARIANT = al.compile(score="log(max(score, 0.0))", mask="q_idx >= kv_idx", normalize=False)

GELU = "0.5 * score * (1.0 + erf(score / sqrt(2.0)))"  # exact GELU (Hendrycks & Gimpel, 2016), as torch's default
GELU_PLUS_OFFSET = al.compile(score=f"g = {GELU}\nlog(g + offset)", mask="q_idx >= kv_idx",
                              params={"offset": 1.0}, normalize=False)
V_SUM = al.compile(score="0.0", mask="q_idx >= kv_idx", normalize=False)  # sum of v over the allowed keys


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


def gelu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **call) -> torch.Tensor:
    """out[b, h, i] = sum over causal keys j of gelu(q.k / sqrt(D)) v[j]: q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D]
    (Hq a multiple of Hkv), any float dtype; ``call``: further keywords of a variant call (``backend``, ...).
    Returns [B, Hq, Sq, D] in q's dtype. Raises AttnLangError for what a variant call refuses."""
    offset = GELU_PLUS_OFFSET.params["offset"]
    return GELU_PLUS_OFFSET(q, k, v, **call) - offset * V_SUM(q, k, v, **call)


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 97, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: relu weights, unnormalized, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
