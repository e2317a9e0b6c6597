"""Prefix LM over packed documents: each document has its own bidirectional prefix, then is causal, alone.

From: attention-gym's composition of ``masks/document_mask.py`` with ``masks/prefix_lm.py`` (packed prefix-LM
training, as in PaliGemma-style image+prompt prefixes packed into one row). Three tensors: ``doc`` (document id per
position), ``offset`` (position inside its document) and ``prefix_len`` (prefix length of each document, indexed by
document id: a tensor read inside a tensor read).
"""

import torch

import attnlang as al

NAME = "prefix_lm_document"
VARIANT = al.compile(mask="doc[q_idx] == doc[kv_idx] & (offset[kv_idx] < prefix_len[doc[kv_idx]] | q_idx >= kv_idx)")


def packed_prefix_documents(length: int, num_docs: int = 4, seed: int = 0, device="cpu"):
    """(doc, offset, prefix_len): int64 [length], int64 [length], int64 [num_docs], documents of seeded lengths,
    each with a seeded prefix of 0 .. its whole length."""
    num_docs = max(1, min(num_docs, length))
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=g)[:num_docs - 1] + 1
    new_doc = torch.zeros(length, dtype=torch.int64)
    new_doc[cuts] = 1
    doc = torch.cumsum(new_doc, 0)
    lengths = torch.bincount(doc, minlength=num_docs)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(length) - starts[doc]
    prefix_len = (torch.rand(num_docs, generator=g) * (lengths + 1)).to(torch.int64)
    return doc.to(device), offset.to(device), prefix_len.to(device)


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``doc``, ``offset``: int64 [max(q_len, kv_len)]; ``prefix_len``: int64 [number of documents]."""
    doc, offset, prefix_len = packed_prefix_documents(max(q_len, kv_len), device=device)
    return {"doc": doc, "offset": offset, "prefix_len": prefix_len}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: documents of lengths {torch.bincount(named['doc']).tolist()} with prefixes "
          f"{named['prefix_len'].tolist()}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
