"""Bottom-right causal attention for decoding with a KV cache: the last query is aligned with the last key.

With ``q_len < kv_len`` (a few new tokens against a cache of ``kv_len - q_len`` earlier ones), query ``i`` sits at
absolute position ``i + kv_len - q_len`` and may see every key up to there. With ``q_len == kv_len`` it is plain
causal attention.

From: FlashAttention-2's causal convention (Dao, 2023, "FlashAttention-2", bottom-right alignment since v2.1),
which is what every KV-cache decoder (Hugging Face transformers, vLLM) computes.

Run it with ``q_len < kv_len``: ``demo_lengths(seq_len)`` gives the lengths the gallery demo uses.
"""

import torch

import attnlang as al

NAME = "decode_causal"
VARIANT = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
DEMO_Q_LEN = 4  # new tokens per decoding step in the demo: a short chunk of queries against the whole cache


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len) for a demo at ``seq_len`` tokens: DEMO_Q_LEN queries against a cache of ``seq_len`` keys."""
    return min(DEMO_Q_LEN, seq_len), seq_len


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q_len, kv_len = demo_lengths(256)
    q = torch.randn(1, 4, q_len, 64)
    k, v = (torch.randn(1, 4, kv_len, 64) for _ in range(2))
    out = VARIANT(q, k, v, **tensors(1, 4, q_len, kv_len))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
