"""Pictures of a variant's mask: the dense (q, kv) mask for short sequences, the block picture (empty / partial /
full) for long ones. matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

import os

import torch

from .ast import names_used
from .errors import AttnLangError

__all__ = ["draw", "DENSE_LIMIT"]

DENSE_LIMIT = 1 << 20  # q_len * kv_len up to which the dense mask is drawn
_COLOURS = ("#f4f4f4", "#f5a623", "#2c5aa0")  # empty, partial, full
_LABELS = ("empty", "partial", "full")


def draw(variant, path, q_len: int, kv_len: int, block_size=(128, 128), batch: int = 1, heads: int = 1,
         **tensors) -> str:
    """Draw ``variant``'s mask for these lengths into ``path`` (PNG or any format matplotlib writes).

    Short sequences (q_len * kv_len <= DENSE_LIMIT): every (q, kv) pair, allowed or not, for b = h = 0. Longer
    ones: one cell per block, coloured empty / partial / full, with a legend.
    Returns:
        a one-line description of what was drawn.
    Raises:
        AttnLangError: bad lengths or tensors (as ``Variant.block_sparsity``), or the file cannot be written.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    bs = variant.block_sparsity(q_len, kv_len, batch, heads, block_size, **tensors)  # a tensor may be 'heads'
    fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.25, q_len / kv_len))), dpi=120)
    try:
        if q_len * kv_len <= DENSE_LIMIT:
            dense = _dense(bs, q_len, kv_len)
            ax.imshow(dense.numpy(), cmap=ListedColormap([_COLOURS[0], _COLOURS[2]]), vmin=0, vmax=1,
                      interpolation="nearest", aspect="auto")
            ax.legend(handles=[Patch(color=_COLOURS[2], label="allowed"), Patch(color=_COLOURS[0],
                                                                                 label="masked")],
                      loc="upper right", fontsize=8)
            what = f"dense mask {q_len}x{kv_len}, {int(dense.sum())} allowed pairs"
            ax.set_title(f"mask: {variant.canonical[1]}"[:90], fontsize=9)
        else:
            kind = bs.kind[0, 0]
            ax.imshow(kind.numpy(), cmap=ListedColormap(list(_COLOURS)), vmin=0, vmax=2,
                      interpolation="nearest", aspect="auto",
                      extent=(0, kv_len, q_len, 0))
            ax.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(_COLOURS, _LABELS)],
                      loc="upper right", fontsize=8)
            c = bs.counts()
            what = (f"block picture {bs.q_blocks}x{bs.kv_blocks} blocks of {bs.block_size[0]}x{bs.block_size[1]}: "
                    f"{c['full']} full, {c['partial']} partial, {c['empty']} empty, density {bs.density:.3f}")
            ax.set_title(f"blocks of mask: {variant.canonical[1]}"[:90], fontsize=9)
        ax.set_xlabel("kv_idx")
        ax.set_ylabel("q_idx")
        fig.tight_layout()
        try:
            # no extension: write PNG to exactly this path (matplotlib would append ".png" to it)
            bare = isinstance(path, (str, os.PathLike)) and not os.path.splitext(os.fspath(path))[1]
            fig.savefig(path, format="png" if bare else None)
        except (OSError, ValueError) as e:
            raise AttnLangError(f"cannot write the picture to {path!r}: {e}") from None
    finally:
        plt.close(fig)
    return what


def _dense(bs, q_len: int, kv_len: int) -> torch.Tensor:
    from .lower_torch import evaluate
    mask = bs.mask
    dev = bs.kind.device
    names = {"b": torch.zeros((), dtype=torch.int64, device=dev), "h": torch.zeros((), dtype=torch.int64,
                                                                                  device=dev),
             "q_idx": torch.arange(q_len, device=dev).view(-1, 1),
             "kv_idx": torch.arange(kv_len, device=dev).view(1, -1),
             "q_len": torch.tensor(q_len, device=dev), "kv_len": torch.tensor(kv_len, device=dev)}
    used = names_used(mask)
    val = evaluate(mask, {n: t for n, t in names.items() if n in used}, dict(bs.tensors), torch.float32, dev)
    return val.expand(q_len, kv_len).to(torch.uint8).cpu()

