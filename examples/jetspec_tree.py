"""JetSpec tree-causal mask for parallel tree drafting and verification: the queries are the nodes of a draft
tree (flattened, parents before children); the keys are ``prefix`` verified tokens followed by the tree's nodes.
Each node sees the whole prefix and the nodes on its own root-to-self path.

From: JetSpec (Hao AI Lab; https://github.com/hao-ai-lab/JetSpec); attention-gym's
``generate_jetspec_tree_causal_mask_mod`` (``masks/jetspec.py``). ``ancestor[i, j]`` is True when tree node j is
on node i's root-to-self path (the diagonal included).
"""

import torch

import attnlang as al

NAME = "jetspec_tree"
PREFIX, NODES = 40, 23
VARIANT = al.compile(
    mask="node = kv_idx - prefix\n"
         "kv_idx < prefix | node < q_len & ancestor[q_idx, clamp(node, 0, q_len - 1)]",
    params={"prefix": PREFIX})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the tree's nodes as queries; the prefix and the nodes as keys."""
    return NODES, PREFIX + NODES


def parents(nodes: int) -> list[int]:
    """A draft tree of ``nodes`` nodes, parents before children (node 0 is the root)."""
    g = torch.Generator().manual_seed(0)
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, nodes)]


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """ancestor: bool [q_len, q_len], the tree's ancestor-or-self matrix."""
    par = parents(q_len)
    anc = torch.eye(q_len, dtype=torch.bool)
    for i in range(1, q_len):
        anc[i] |= anc[par[i]]
    return {"ancestor": anc.to(device)}


if __name__ == "__main__":
    n, m = demo_lengths(0)
    q = torch.randn(1, 4, n, 64)
    k, v = (torch.randn(1, 4, m, 64) for _ in range(2))
    named = tensors(1, 4, n, m)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {NODES} tree nodes after a {PREFIX}-token prefix, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
