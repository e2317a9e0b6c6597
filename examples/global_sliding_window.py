"""Longformer-style global + sliding window attention: a bidirectional window of ``window`` keys on each side, and
global tokens, marked by a bool tensor, that attend to every position and that every position attends to.

From: attention-gym's ``generate_global_sliding_window`` (``masks/global_sliding_window.py``); Longformer (Beltagy
et al., 2020, "Longformer: The Long-Document Transformer": [CLS] and question tokens are global). ``is_global``:
bool [seq_len], any positions (examples/global_tokens.py is the special case of the first few positions, with a
compile-time parameter instead of a tensor).
"""

import torch

import attnlang as al

NAME = "global_sliding_window"
VARIANT = al.compile(mask="is_global[q_idx] | is_global[kv_idx] | abs(q_idx - kv_idx) <= window",
                     params={"window": 16})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``is_global``: bool [max(q_len, kv_len)], position 0 ([CLS]) and a seeded handful of others global."""
    n = max(q_len, kv_len)
    g = torch.Generator().manual_seed(0)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[0] = True
    is_global[torch.randperm(n, generator=g)[:max(1, n // 40)]] = True
    return {"is_global": is_global.to(device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {int(named['is_global'].sum())} global tokens, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
