"""T5 relative position buckets: a learned per-head bias read from a table at a log-spaced distance bucket.

From: T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"), ``T5Attention._relative_position_bucket`` in Hugging Face transformers (bidirectional, as in the
encoder); attention-gym's relative-position score mods. With ``relative = kv_idx - q_idx``, half the buckets are
for keys after the query; of each half, distances below ``num_buckets // 4`` get one bucket each, larger ones
share log-spaced buckets up to ``max_distance``. The bucket is computed in the language; ``bias`` is the learned
table, float [H, num_buckets].
"""

import torch

import attnlang as al

NAME = "t5_relative_bias"
_DISTANCE = "abs(kv_idx - q_idx)"
_EXACT = "num_buckets // 4"  # distances with a bucket of their own, per direction
_LARGE = (f"min({_EXACT} + int(log(float(max({_DISTANCE}, 1)) / ({_EXACT})) / log(max_distance / ({_EXACT}))"
          f" * (num_buckets // 2 - {_EXACT})), num_buckets // 2 - 1)")
BUCKET = f"where(kv_idx > q_idx, num_buckets // 2, 0) + where({_DISTANCE} < {_EXACT}, {_DISTANCE}, {_LARGE})"
# the bucket is always inside the table; clamp says so to the bounds check, which cannot see through log
VARIANT = al.compile(score=f"score + bias[h, clamp({BUCKET}, 0, num_buckets - 1)]",
                     params={"num_buckets": 32, "max_distance": 128})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``bias``: float32 [q_heads, num_buckets], a (seeded random) learned relative-attention-bias table."""
    g = torch.Generator().manual_seed(0)
    return {"bias": torch.randn(q_heads, VARIANT.params["num_buckets"], generator=g).to(device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
