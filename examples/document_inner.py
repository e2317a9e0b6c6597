"""Document masking around any inner mask: packed documents attend only within themselves, and inside each one an
inner mask applies to positions counted from the document's start (here a prefix LM: the first ``prefix`` tokens
of every document are bidirectional, the rest causal).

From: attention-gym's ``generate_doc_mask_mod(mask_mod, offsets)`` (``masks/document_mask.py``), which wraps an
inner mask_mod function and calls it with each position minus its document's offset. In attnlang the wrapper is
composition of variants: ``DOCUMENTS & INNER`` (``Variant.__and__``; the parts' tensors ``doc`` and ``offsets``
merge by name), and the inner mask reads the logical positions through bindings, ``ql = q_idx - offsets[doc[q_idx]]``.
``doc``: int64 [seq_len], the document of each position; ``offsets``: int64 [documents + 1], cumulative lengths
(attention-gym's layout: 0, len0, len0 + len1, ...). examples/document.py is the causal inner mask, for which
logical and packed positions agree; examples/prefix_lm_document.py has a prefix length per document.
"""

import torch

import attnlang as al

NAME = "document_inner"
DOCUMENTS = al.compile(mask="doc[q_idx] == doc[kv_idx]")
INNER = al.compile(mask="ql = q_idx - offsets[doc[q_idx]]\n"
                        "kl = kv_idx - offsets[doc[kv_idx]]\n"
                        "kl < prefix | ql >= kl", params={"prefix": 6})
VARIANT = DOCUMENTS & INNER


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``doc``: int64 [max(q_len, kv_len)], five documents of seeded, different lengths; ``offsets``: int64 [6]."""
    n = max(q_len, kv_len)
    docs = max(1, min(5, n))
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(n - 1, generator=g)[:docs - 1] + 1).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])])
    doc = torch.bucketize(torch.arange(n), offsets[1:], right=True)
    return {"doc": doc.to(device), "offsets": offsets.to(device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: documents of lengths {torch.diff(named['offsets']).tolist()}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
