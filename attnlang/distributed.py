"""Context parallelism: one sequence split over the ranks of a torch.distributed process group (self-attention).

    import attnlang.distributed as ald
    positions = ald.shard_positions(v, seq_len=S, world_size=W, **tensors)        # the same on every rank
    out, lse = ald.attention(v, q[:, :, positions[rank]], k[:, :, positions[rank]], v_[:, :, positions[rank]],
                             positions=positions, **tensors)

How it works (ring attention, Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the head-and-tail
"zigzag" split of zhuzilin/ring-flash-attention and torch's ``context_parallel``; per-document balancing in the
spirit of MagiAttention):

- ``shard_positions`` cuts the sequence into chunks (128 positions; fewer for short sequences, so that every rank
  gets at least 16 chunks; more past 2M positions, see ``chunk_size``), counts the allowed (q, kv) pairs of every
  query chunk from the mask's block sparsity (full blocks exactly, partial blocks by evaluating the mask on them
  within a budget, else half their size), and
  gives each rank chunks of about the same work: contiguous shards when that is balanced already (full, sliding
  window), else the zigzag split (rank r takes pieces r and 2W-1-r of 2W; causal, prefix LM, ALiBi), else
  contiguous shards cut by work (many short documents: each rank keeps its neighbours, so shards stop travelling
  early) where that leaves no rank more than 1.25x the mean positions, else a per-document split: the sequence
  falls into groups that no allowed pair crosses (documents), each group is cut into head-and-tail pairs of its
  chunks, and the pairs go, largest first, to the rank with the least work.
- ``attention`` evaluates the variant on local query rows against one shard of keys at a time, with the GLOBAL
  positions of LANGUAGE.md: the variant is rewritten once (``position_variant``) so that ``q_idx`` reads
  ``cp_q_positions[q_idx]``, ``kv_idx`` reads ``cp_kv_positions[kv_idx]`` and ``q_len`` / ``kv_len`` are the global
  length; every backend runs it as any variant reading tensors (one compiled kernel for every step).
- k / v shards travel round the ring with ``dist.batch_isend_irecv``, the transfer for the next step posted before
  the shard in hand is computed. The communication plan (``plan_communication``) comes from the mask's block
  sparsity at the chunks' granularity: a (rank, shard) pair with no allowed pair is not computed, and a shard stops
  travelling after the last rank that needs it.
- Partial results merge exactly through lse (online softmax). The backward runs the ring again: each rank
  recomputes its partial results, backpropagates through the merge (the backends differentiate lse), and the dk / dv
  accumulator of a shard travels with it and then returns to its owner; gradients of floating named tensors are
  summed over ranks with ``all_reduce``.
- Sinks and ``normalize=False`` (LANGUAGE.md) apply once, to the merged result: the sink is evaluated at the
  local rows' global positions (``sink_variant``) and enters the denominator after the ring, as
  ``attnlang.denominator`` does for one process; its tensors' gradients are summed over ranks.
- Before any ring step every rank checks its inputs and the ranks agree through one ``all_gather_object``: bad input
  on any rank is an AttnLangError on every rank, never a hang. An error that shows only while a block is computed
  (a NaN score in one rank's rows, a NaN sink) lets that rank finish its transfers without computing; one 4-byte
  ``all_reduce`` after the forward then makes it an AttnLangError on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections import OrderedDict
from typing import Mapping, MutableMapping, Sequence

import torch
import torch.distributed as dist

from .ast import Const, DType, Index, Var, children, with_children
from .denominator import check_numerator
from .errors import AttnLangError
from .memo import MEMO
from .printer import to_source

__all__ = ["shard_positions", "attention", "plan_communication", "CommPlan", "position_variant", "sink_variant",
           "chunk_size",
           "chunk_work", "rank_work", "POSITION_TENSORS"]

Q_POSITIONS, KV_POSITIONS = "cp_q_positions", "cp_kv_positions"
POSITION_TENSORS = (Q_POSITIONS, KV_POSITIONS)

MAX_CHUNK = 128              # FA4's / flex's 128-row tiles: a chunk never splits a kernel tile
MIN_CHUNKS_PER_RANK = 16     # finer chunks for short sequences, so that balancing has room
COUNT_BUDGET = 1 << 25       # (q, kv) positions evaluated, at most, to count the allowed pairs of partial blocks
PLAN_BLOCKS = 1 << 28        # blocks analysed, at most, for a communication plan (beyond: no step is skipped)
BALANCED = 1.05              # max / mean work per rank up to which a simpler layout (less traffic) is kept
KEEP_FACTOR = 1.5            # keep the forward's graphs when remote shards used hold <= this x own positions
TOKEN_SPREAD = 1.25          # max / mean positions per rank that a contiguous cut by work may give (memory)


# ---------------------------------------------------------------------------------------------------------------
# the variant at global positions

def position_variant(v, seq_len: int):
    """``v`` rewritten to run on gathered rows: ``q_idx`` -> ``cp_q_positions[q_idx]``, ``kv_idx`` ->
    ``cp_kv_positions[kv_idx]``, ``q_len`` / ``kv_len`` -> ``seq_len``.

    Called with ``cp_q_positions`` = the global positions of the query rows (int64 [Sq]) and ``cp_kv_positions``
    those of the key rows, it computes the rows of ``v`` at those positions (each tensor only where read).
    Raises:
        AttnLangError: ``v`` reads a tensor named like the position tensors.
    """
    return _position_variant(v, int(seq_len))


def sink_variant(v, seq_len: int):
    """None without a sink; else a variant whose lse, called on gathered query rows with ``cp_q_positions``, is
    ``v``'s sink at those global positions (its mask allows no key: out 0, lse = sink)."""
    return _position_variant(v, int(seq_len), "sink") if v.sink is not None else None


@functools.lru_cache(maxsize=256)
def _position_variant(v, seq_len: int, kind: str = "softmax"):
    from .variant import compile as compile_variant
    clash = sorted(set(POSITION_TENSORS) & set(v.tensor_names))
    if clash:
        raise AttnLangError(f"tensor name {clash[0]!r} is used by attnlang.distributed for the global positions; "
                            f"rename the tensor")
    length = Const(seq_len, DType.INT)

    def sub(node):
        if isinstance(node, Var):
            if node.name == "q_idx":
                return Index(Q_POSITIONS, (node,), node.span, DType.INT)
            if node.name == "kv_idx":
                return Index(KV_POSITIONS, (node,), node.span, DType.INT)
            if node.name in ("q_len", "kv_len"):
                return length
            return node
        kids = children(node)
        return with_children(node, tuple(sub(k) for k in kids)) if kids else node

    checked = v.checked
    if kind == "sink":
        # the sink alone: no key is allowed, so a call's lse is the sink of each row (LANGUAGE.md)
        return compile_variant("score", "False", sink=to_source(sub(checked.sink)))
    return compile_variant(to_source(sub(checked.score)), to_source(sub(checked.mask)))


# ---------------------------------------------------------------------------------------------------------------
# sharding

def chunk_size(seq_len: int, world_size: int) -> int:
    """Positions per chunk: the largest power of two <= 128 that leaves every rank 16 chunks (at least 1); for
    sequences so long that the chunks' block sparsity would exceed PLAN_BLOCKS blocks (S > 2M at 128), the
    smallest multiple 2^k * 128 that keeps within it (so that ``shard_positions`` works at any length)."""
    c = MAX_CHUNK
    while c > 1 and seq_len < c * MIN_CHUNKS_PER_RANK * world_size:
        c //= 2
    while (-(-seq_len // c)) ** 2 > PLAN_BLOCKS:
        c *= 2
    return c


def _check_sizes(seq_len, world_size) -> tuple[int, int]:
    for name, x in (("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise AttnLangError(f"{name} must be a positive int, got {x!r}")
    return int(seq_len), int(world_size)


def _sparsity(v, seq_len: int, block: int, tensors: Mapping, batch: int = 1, heads: int = 1):
    from .sparsity import block_sparsity_of
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise AttnLangError(f"tensor {n!r} must be a torch.Tensor, got {type(t).__name__}")
    cpu = {n: t.detach().cpu() for n, t in tensors.items()}
    return block_sparsity_of(v, seq_len, seq_len, batch, heads, (block, block), cpu, device="cpu")


def _block_sizes(seq_len: int, block: int) -> torch.Tensor:
    n = -(-seq_len // block)
    sizes = torch.full((n,), float(block), dtype=torch.float64)
    sizes[-1] = seq_len - block * (n - 1)
    return sizes


def chunk_work(v, seq_len: int, chunk: int, **tensors) -> torch.Tensor:
    """Allowed (q, kv) pairs of each query chunk (float64 [ceil(S / chunk)], for b = 0, h = 0): full blocks
    exactly, partial blocks counted by evaluating the mask on them within COUNT_BUDGET positions (the rest
    estimated at half their size)."""
    bs = _sparsity(v, seq_len, chunk, tensors)
    return _chunk_work(bs, seq_len, chunk)


def _chunk_work(bs, seq_len: int, chunk: int) -> torch.Tensor:
    kind = bs.kind[0, 0]
    sizes = _block_sizes(seq_len, chunk)
    work = (kind == 2).to(torch.float64) @ sizes * sizes
    pi, pj = (kind == 1).nonzero(as_tuple=True)
    if pi.numel():
        counted = torch.zeros(pi.numel(), dtype=torch.float64)
        per = chunk * chunk
        budget = COUNT_BUDGET // per
        exact = min(pi.numel(), budget)
        step = max(1, (1 << 22) // per)
        for s in range(0, exact, step):
            counted[s:s + step] = _count_blocks(bs, pi[s:s + step], pj[s:s + step], chunk, seq_len)
        if exact < pi.numel():
            counted[exact:] = 0.5 * sizes[pi[exact:]] * sizes[pj[exact:]]
        work.index_add_(0, pi, counted)
    return work


def _count_blocks(bs, bi: torch.Tensor, bj: torch.Tensor, chunk: int, seq_len: int) -> torch.Tensor:
    from .lower_torch import evaluate
    offs = torch.arange(chunk)
    qi = bi[:, None] * chunk + offs                     # [P, c]
    kj = bj[:, None] * chunk + offs
    valid = (qi < seq_len)[:, :, None] & (kj < seq_len)[:, None, :]
    names = {"b": torch.tensor(0), "h": torch.tensor(0), "q_idx": qi.clamp(max=seq_len - 1)[:, :, None],
             "kv_idx": kj.clamp(max=seq_len - 1)[:, None, :], "q_len": torch.tensor(seq_len),
             "kv_len": torch.tensor(seq_len)}
    allowed = evaluate(bs.mask, names, dict(bs.tensors), torch.float64, torch.device("cpu"))
    return (allowed.expand(valid.shape) & valid).sum((1, 2)).to(torch.float64)


def _split_even(n: int, parts: int) -> list[range]:
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _contiguous(work: torch.Tensor, world: int) -> list[list[int]]:
    return [list(r) for r in _split_even(len(work), world)]


def _zigzag(work: torch.Tensor, world: int) -> list[list[int]]:
    pieces = _split_even(len(work), 2 * world)
    return [list(pieces[r]) + list(pieces[2 * world - 1 - r]) for r in range(world)]


def _contiguous_by_work(work: torch.Tensor, world: int) -> list[list[int]]:
    """Contiguous shards cut where the running work crosses r / W of the total (each rank keeps its neighbours)."""
    total = float(work.sum())
    if total <= 0:
        return _contiguous(work, world)
    mid = torch.cumsum(work, 0) - work / 2          # the work before each chunk's middle
    owner = torch.clamp((mid / total * world).floor().long(), 0, world - 1)
    owner = torch.cummax(owner, 0).values
    return [torch.nonzero(owner == r).flatten().tolist() for r in range(world)]


def _token_spread(assignment: list[list[int]], sizes: torch.Tensor) -> float:
    tokens = [float(sizes[a].sum()) if a else 0.0 for a in assignment]
    return max(tokens) / (sum(tokens) / len(tokens))


def _groups(kind: torch.Tensor) -> list[range]:
    """Maximal runs of chunks that no allowed pair crosses (documents, at the chunks' granularity)."""
    n = kind.shape[0]
    nz = kind != 0
    cols = torch.arange(n)
    reach_hi = torch.where(nz, cols, torch.tensor(-1)).amax(1)      # last kv chunk each query chunk sees
    reach_lo = torch.where(nz, cols, torch.tensor(n)).amin(1)
    # symmetric: a boundary before chunk i needs no pair (a < i, b >= i) and none (a >= i, b < i)
    hi_before = torch.cummax(reach_hi, 0).values                     # max over a <= i-1
    lo_after = torch.flip(torch.cummin(torch.flip(reach_lo, [0]), 0).values, [0])  # min over a >= i
    col_hi = torch.where(nz, torch.arange(n)[:, None], torch.tensor(-1)).amax(0)  # last q chunk seeing kv chunk
    col_lo = torch.where(nz, torch.arange(n)[:, None], torch.tensor(n)).amin(0)
    col_hi_before = torch.cummax(col_hi, 0).values
    col_lo_after = torch.flip(torch.cummin(torch.flip(col_lo, [0]), 0).values, [0])
    starts = [0]
    for i in range(1, n):
        if (hi_before[i - 1] < i and lo_after[i] >= i and col_hi_before[i - 1] < i and col_lo_after[i] >= i):
            starts.append(i)
    starts.append(n)
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def _per_document(kind: torch.Tensor, work: torch.Tensor, sizes: torch.Tensor, world: int) -> list[list[int]]:
    units = []
    for g in _groups(kind):
        m = len(g)
        for k in range((m + 1) // 2):
            unit = [g[k]] if g[k] == g[m - 1 - k] else [g[k], g[m - 1 - k]]
            units.append(unit)
    units.sort(key=lambda u: (-float(work[u].sum()), u[0]))
    load = [0.0] * world
    tokens = [0.0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    for unit in units:
        r = min(range(world), key=lambda i: (load[i], tokens[i], i))
        ranks[r].extend(unit)
        load[r] += float(work[unit].sum())
        tokens[r] += float(sizes[unit].sum())
    return [sorted(r) for r in ranks]


def _imbalance(assignment: list[list[int]], work: torch.Tensor) -> float:
    loads = torch.tensor([float(work[a].sum()) if a else 0.0 for a in assignment], dtype=torch.float64)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


def shard_positions(v, seq_len: int, world_size: int, **tensors) -> list[torch.Tensor]:
    """Split positions ``range(seq_len)`` into ``world_size`` shards of about equal attention work.

    Args:
        v: the Variant (its mask's block sparsity decides the split).
        seq_len: S, the global sequence length. world_size: W, the number of ranks.
        **tensors: the tensors the variant reads, global (``doc`` is ``[S]``); only the mask's are looked at.
    Returns:
        a list of W int64 CPU tensors of global positions, ascending, together a permutation of range(S), made of
        whole chunks of ``chunk_size(S, W)`` positions. The first layout whose max / mean work per rank is within
        5% is taken, in this order: contiguous, zigzag, contiguous cut by work (only where no rank holds more than
        1.25x the mean positions), per document (see the module docstring); if none is, the most balanced one.
        Work is counted for b = 0, h = 0. Deterministic: every rank computes the same list.
    Raises:
        AttnLangError: bad sizes, or tensors the variant cannot read at these lengths.
    """
    seq_len, world_size = _check_sizes(seq_len, world_size)
    from .variant import Variant
    if not isinstance(v, Variant):
        raise AttnLangError(f"shard_positions takes a Variant, got {type(v).__name__}")
    chunk = chunk_size(seq_len, world_size)
    bs = _sparsity(v, seq_len, chunk, tensors)
    work = _chunk_work(bs, seq_len, chunk)
    sizes = _block_sizes(seq_len, chunk)
    if world_size == 1 or len(work) < world_size:
        chunks = _contiguous(work, world_size)
    else:
        best = None
        layouts = ((lambda: _contiguous(work, world_size), math.inf),
                   (lambda: _zigzag(work, world_size), math.inf),
                   (lambda: _contiguous_by_work(work, world_size), TOKEN_SPREAD),
                   (lambda: _per_document(bs.kind[0, 0], work, sizes, world_size), math.inf))
        for make, spread in layouts:
            candidate = make()
            if _token_spread(candidate, sizes) > spread:
                continue
            score = _imbalance(candidate, work)
            if best is None or score < best[0] - 1e-9:
                best = (score, candidate)
            if score <= BALANCED:
                break
        chunks = best[1]
    return [_chunk_positions(c, chunk, seq_len) for c in chunks]


def _chunk_positions(chunks: list[int], chunk: int, seq_len: int) -> torch.Tensor:
    if not chunks:
        return torch.zeros(0, dtype=torch.int64)
    parts = [torch.arange(c * chunk, min(seq_len, (c + 1) * chunk), dtype=torch.int64) for c in sorted(chunks)]
    return torch.cat(parts)


def rank_work(v, positions: Sequence[torch.Tensor], **tensors) -> list[float]:
    """Allowed (q, kv) pairs whose query lies on each rank (b = 0, h = 0): exact where the plan's blocks are full
    or counted within budget, as ``chunk_work``."""
    positions = _as_positions(positions)
    seq_len = sum(len(p) for p in positions)
    g = _plan_granularity(positions, seq_len)
    work = chunk_work(v, seq_len, g, **tensors)
    owner = _owners(positions, seq_len, g)
    loads = torch.zeros(len(positions), dtype=torch.float64).index_add_(0, owner, work)
    return loads.tolist()


# ---------------------------------------------------------------------------------------------------------------
# the communication plan

@dataclasses.dataclass(frozen=True)
class CommPlan:
    """Which shard each rank needs at each ring step, and what travels.

    needed: bool [W, W]; needed[r, s]: some query of rank r may attend to some key of rank s.
    last_step: per shard s, the last ring step t at which a rank, (s + t) % W, needs it (-1: none does); the shard
        is sent at steps 1..last_step only.
    granularity: positions per block of the analysis (blocks never straddle two ranks).
    lengths: positions per rank.
    """

    needed: torch.Tensor
    last_step: tuple[int, ...]
    granularity: int
    lengths: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    def holder(self, shard: int, step: int) -> int:
        return (shard + step) % self.world_size

    def computed_steps(self) -> list[int]:
        """Per rank, the ring steps whose shard it computes with."""
        return [int(self.needed[r].sum()) for r in range(self.world_size)]

    def skipped_steps(self) -> list[int]:
        return [self.world_size - c for c in self.computed_steps()]

    def forward_sends(self) -> list[list[int]]:
        """Per rank, the shards it sends to the next rank in the forward ring."""
        out = [[] for _ in range(self.world_size)]
        for s, last in enumerate(self.last_step):
            for t in range(1, last + 1):
                out[self.holder(s, t - 1)].append(s)
        return out

    def bytes_sent(self, bytes_per_token: float, backward: bool = False, grad_bytes_per_token: float | None = None
                   ) -> list[float]:
        """Bytes each rank sends: forward k / v shards (``bytes_per_token`` per position), or with ``backward``
        the backward's k / v plus dk / dv accumulators (``grad_bytes_per_token``, default float32 of the same
        elements: 2x bf16) and the accumulators' return to their owners."""
        gb = 2 * bytes_per_token if grad_bytes_per_token is None else grad_bytes_per_token
        out = [0.0] * self.world_size
        for s, last in enumerate(self.last_step):
            n = self.lengths[s]
            for t in range(1, last + 1):
                out[self.holder(s, t - 1)] += n * (bytes_per_token + (gb if backward else 0.0))
            if backward and last >= 1:
                out[self.holder(s, last)] += n * gb   # the accumulator goes home
        return out

    def transfers_skipped(self) -> int:
        """Sends of a full ring (W * (W - 1)) that this plan leaves out."""
        w = self.world_size
        return w * (w - 1) - sum(max(0, t) for t in self.last_step)

    def summary(self) -> dict:
        return {"world_size": self.world_size, "granularity": self.granularity,
                "computed_steps": self.computed_steps(), "skipped_steps": self.skipped_steps(),
                "last_step": list(self.last_step), "transfers_skipped": self.transfers_skipped()}


def _as_positions(positions) -> list[torch.Tensor]:
    if isinstance(positions, torch.Tensor) or not isinstance(positions, Sequence) or not positions:
        raise AttnLangError("positions must be a non-empty list of 1-D int64 tensors, one per rank (from "
                            "shard_positions)")
    out = []
    for r, p in enumerate(positions):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.dtype.is_floating_point or p.dtype == torch.bool \
                or p.is_complex():
            raise AttnLangError(f"positions[{r}] must be a 1-D integer tensor, got "
                                f"{type(p).__name__ if not isinstance(p, torch.Tensor) else (p.dtype, tuple(p.shape))}")
        out.append(p.detach().to("cpu", torch.int64))
    allpos = torch.cat(out)
    S = allpos.numel()
    if S == 0:
        raise AttnLangError("positions hold no position at all; the sequence must have at least one")
    if not torch.equal(torch.sort(allpos).values, torch.arange(S)):
        raise AttnLangError(f"positions are not a permutation of range({S}): every position must appear on exactly "
                            f"one rank")
    return out


def _granularity(positions: list[torch.Tensor], seq_len: int, cap: int = MAX_CHUNK) -> int:
    """The largest power of two <= cap that divides every run of consecutive positions (a run that ends at S may be
    ragged), so that a block of that size lies on one rank."""
    g = cap
    for p in positions:
        if p.numel() == 0:
            continue
        breaks = torch.nonzero(p[1:] != p[:-1] + 1).flatten() + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
        ends = torch.cat([breaks, torch.tensor([p.numel()])])
        first, length = p[starts], ends - starts
        last = first + length
        for x in torch.cat([first, length[last != seq_len]]).tolist():
            g = math.gcd(g, int(x))
            if g == 1:
                return 1
    return g


def _plan_granularity(positions: list[torch.Tensor], seq_len: int) -> int:
    """``_granularity`` (<= 128), coarsened (by powers of two, still never straddling two ranks) where the analysis
    would exceed PLAN_BLOCKS blocks: the long sequences whose shards ``chunk_size`` cuts in chunks > 128."""
    g = _granularity(positions, seq_len)
    if (-(-seq_len // g)) ** 2 > PLAN_BLOCKS:
        coarse = _granularity(positions, seq_len, cap=1 << 62)
        while g < coarse and (-(-seq_len // g)) ** 2 > PLAN_BLOCKS:
            g *= 2
    return g


def _owners(positions: list[torch.Tensor], seq_len: int, g: int) -> torch.Tensor:
    owner = torch.empty(seq_len, dtype=torch.int64)
    for r, p in enumerate(positions):
        owner[p] = r
    return owner[::g].contiguous()


def plan_communication(v, positions: Sequence[torch.Tensor], batch: int = 1, heads: int = 1, **tensors) -> CommPlan:
    """The ring's communication plan for ``positions``, from the mask's block sparsity (no attention is run).

    Args:
        v: the Variant; positions: as from ``shard_positions``; batch, heads: the sizes ``b`` / ``h`` range over
            (only used when the mask reads them); **tensors: the variant's tensors, global.
    Returns:
        CommPlan. Sound: a pair marked not needed holds no allowed (q, kv) pair. When the positions' runs are so
        fine that the analysis would exceed PLAN_BLOCKS blocks, every pair is needed (nothing skipped).
    """
    positions = _as_positions(positions)
    return _plan(v, positions, batch, heads, tensors)


def _plan(v, positions: list[torch.Tensor], batch: int, heads: int, tensors: Mapping) -> CommPlan:
    world = len(positions)
    seq_len = sum(len(p) for p in positions)
    lengths = tuple(len(p) for p in positions)
    g = _plan_granularity(positions, seq_len)
    nblocks = -(-seq_len // g)
    if nblocks * nblocks > PLAN_BLOCKS:
        needed = torch.ones(world, world, dtype=torch.bool)
    else:
        kind = _sparsity(v, seq_len, g, tensors, batch, heads).kind
        nz = (kind != 0).flatten(0, 1).any(0)                  # [Qb, Kb]
        owner = _owners(positions, seq_len, g)
        onehot = torch.nn.functional.one_hot(owner, world).to(torch.float32)
        needed = torch.zeros(world, world, dtype=torch.bool)
        rows = max(1, (1 << 24) // max(1, nblocks))
        for r0 in range(0, nblocks, rows):
            sees = (nz[r0:r0 + rows].to(torch.float32) @ onehot) > 0          # [rows, W]: sees a key of rank s
            hit = torch.zeros(world, world, dtype=torch.float32).index_add_(0, owner[r0:r0 + rows],
                                                                            sees.to(torch.float32))
            needed |= hit > 0
    for r, n in enumerate(lengths):
        if n == 0:
            needed[r, :] = False
            needed[:, r] = False
    last = []
    for s in range(world):
        steps = [t for t in range(world) if needed[(s + t) % world, s]]
        last.append(max(steps) if steps else -1)
    return CommPlan(needed=needed, last_step=tuple(last), granularity=g, lengths=lengths)


_PLANS: "OrderedDict[tuple, CommPlan]" = OrderedDict()
_DEVICE_POSITIONS: "OrderedDict[tuple, list]" = OrderedDict()


def _device_positions(positions: list[torch.Tensor], device) -> list[torch.Tensor]:
    """The position tensors on q's device, the same objects call after call (so the backends' per-tensor caches
    of value ranges and block sparsity hit)."""
    key = (_positions_digest(positions), str(device))
    got = _DEVICE_POSITIONS.get(key)
    if got is None:
        got = [p.to(device) for p in positions]
        _DEVICE_POSITIONS[key] = got
        if len(_DEVICE_POSITIONS) > 16:
            _DEVICE_POSITIONS.popitem(last=False)
    return got


def _cached_plan(key, make) -> CommPlan:
    got = _PLANS.get(key)
    if got is None:
        got = make()
        _PLANS[key] = got
        if len(_PLANS) > 64:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return got


# ---------------------------------------------------------------------------------------------------------------
# checks that every rank agrees on

def _plan_key(v, positions: list[torch.Tensor], batch: int, heads: int, tensors: Mapping) -> tuple:
    """What a communication plan depends on: the mask tensors by their exact values. (Two sums, as keyed before,
    are the same for tensors that differ, e.g. by values swapped at positions 1009 apart, and a cached plan of the
    other tensor skipped steps this one needs: a silently wrong out.)"""
    return (v, _positions_digest(positions), batch, heads,
            tuple((n, MEMO.get(t, "ring plan", _digest)) for n, t in sorted(tensors.items()) if n in _mask_tensors(v)))


def _digest(t: torch.Tensor) -> str:
    """A digest of a tensor's shape, dtype and values (its bytes, read on the host; -0.0 as 0.0 and every NaN as
    one NaN, so that equal tensors on every rank agree)."""
    x = t.detach().reshape(-1).cpu()
    if x.is_floating_point():
        x = torch.where(x.isnan(), torch.nan, x + 0.0)
    if x.numel() and x.stride(0) != 1:
        x = x.clone(memory_format=torch.contiguous_format)
    h = hashlib.sha1(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(x.view(torch.uint8).numpy())
    return h.hexdigest()


def _positions_digest(positions: list[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for p in positions:
        h.update(str(p.numel()).encode())
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def _local_checks(v, q, k, vv, positions, rank, world, backend, scale, tensors, options):
    """(signature, positions as CPU tensors); raises AttnLangError on bad input. Checked on every rank before any
    rank raises (``_agree``), so that one rank's bad argument cannot leave the others waiting."""
    from .variant import BACKENDS, Variant
    if not isinstance(v, Variant):
        raise AttnLangError(f"attention takes a Variant as its first argument, got {type(v).__name__}")
    return_lse, recompute, comm_stats = options
    if not isinstance(return_lse, bool):
        raise AttnLangError(f"return_lse must be True or False, got {return_lse!r}")
    if recompute is not None and not isinstance(recompute, bool):
        raise AttnLangError(f"recompute must be True, False or None, got {recompute!r}")
    if comm_stats is not None and not isinstance(comm_stats, MutableMapping):
        raise AttnLangError(f"comm_stats must be a dict (or None), got {type(comm_stats).__name__}")
    if "kernel_options" in tensors and "kernel_options" not in v.tensor_names:
        raise AttnLangError("attnlang.distributed.attention takes no kernel_options: each block runs with the "
                            "backend's defaults (backend= chooses the backend)")
    pos = _as_positions(positions)
    if len(pos) != world:
        raise AttnLangError(f"positions has {len(pos)} shards but the process group has {world} ranks")
    if backend not in BACKENDS:
        raise AttnLangError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for name, t in (("q_local", q), ("k_local", k), ("v_local", vv)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttnLangError(f"{name} must be a 4-D tensor [B, H, len(positions[rank]), D], got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape[2] != len(pos[rank]):
            raise AttnLangError(f"{name} has {t.shape[2]} rows on rank {rank} but positions[{rank}] has "
                                f"{len(pos[rank])}: the shards must be the rows at positions[rank]")
    S = sum(len(p) for p in pos)
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], vv.shape[3]

    def glob(t):  # a stride-0 stand-in of the global tensor for the single-process checks (its own B, H, D)
        return torch.empty(1, dtype=t.dtype, device=t.device).view(1, 1, 1, 1).expand(t.shape[0], t.shape[1], S,
                                                                                     t.shape[3])
    plan = v._plan(glob(q), glob(k), glob(vv), scale, backend, True, None, tensors)
    position_variant(v, S)
    # which inputs autograd differentiates: a rank whose backward never runs, or skips a named tensor's
    # all_reduce, would leave the others waiting in the backward's ring
    grads = (torch.is_grad_enabled(), q.requires_grad, k.requires_grad, vv.requires_grad,
             tuple((n, tensors[n].requires_grad) for n in sorted(tensors)))
    signature = (v.canonical, S, world, _positions_digest(pos), (B, Hq, Hkv, D, k.shape[3], Dv), str(q.dtype),
                 str(k.dtype), str(vv.dtype), backend, plan.scale,
                 tuple((n, tuple(tensors[n].shape), str(tensors[n].dtype)) for n in sorted(tensors)),
                 tuple((n, MEMO.get(tensors[n], "ring plan", _digest)) for n in sorted(tensors)), grads, recompute)
    return signature, pos


def _mask_tensors(v) -> set:
    return {n.tensor for n in _walk(v.simplified.mask) if isinstance(n, Index)}


def _walk(e):
    from .ast import walk
    return walk(e)


_SIGNATURE_FIELDS = ("the variant", "the sequence length", "the world size", "positions", "the shapes [B, Hq, Hkv, "
                     "D, Dk, Dv]", "q's dtype", "k's dtype", "v's dtype", "backend", "scale", "the named tensors' "
                     "shapes and dtypes", "the named tensors' values", "which inputs require grad (q, k, v, the "
                     "named tensors) or grad mode", "recompute")


def _agree(v, q, k, vv, positions, group, backend, scale, tensors, options):
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise AttnLangError(f"group must be a torch.distributed process group (or None: the world), got "
                            f"{type(group).__name__} ({e})") from None
    if rank < 0:
        raise AttnLangError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                            f"passed as group=; call attention only on the group's ranks")
    error, signature, pos = None, None, None
    try:
        signature, pos = _local_checks(v, q, k, vv, positions, rank, world, backend, scale, tensors, options)
    except AttnLangError as e:
        error = str(e)
    except Exception as e:  # anything else would leave the other ranks waiting in the ring
        error = f"{type(e).__name__}: {e}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (error, signature), group=group)
    bad = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if bad:
        ranks = ", ".join(str(r) for r, _ in bad)
        raise AttnLangError(f"context-parallel attention refused (bad input on rank {ranks}); rank {bad[0][0]}: "
                            f"{bad[0][1]}")
    first = gathered[0][1]
    for r, (_, sig) in enumerate(gathered):
        if sig != first:
            field = next(_SIGNATURE_FIELDS[i] for i, (a, b) in enumerate(zip(first, sig)) if a != b)
            raise AttnLangError(f"context-parallel attention refused: rank {r} differs from rank 0 in {field}; "
                                f"every rank must call with the same variant, positions, shapes, dtypes and "
                                f"tensors")
    return rank, world, pos


# ---------------------------------------------------------------------------------------------------------------
# the ring

@dataclasses.dataclass
class _Ring:
    v: object                    # the position variant
    group: object
    rank: int
    world: int
    positions: list              # on the device
    plan: CommPlan
    backend: str
    scale: float | None
    names: tuple                 # named tensors, in the order passed to the Function
    grad_names: tuple            # those that are floating (their gradients are all-reduced)
    stats: dict
    keep: bool = False           # keep each step's autograd graph (no recompute, no backward ring)
    original: object = None      # the user's variant, whose expressions an error shows

    def peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r % self.world) if self.group is not None else r % self.world

    def partial(self, q, k, v, shard: int, tensors: Mapping):
        wanted = set(self.v.tensor_names)
        call = {n: t for n, t in tensors.items() if n in wanted}
        if Q_POSITIONS in wanted:
            call[Q_POSITIONS] = self.positions[self.rank]
        if KV_POSITIONS in wanted:
            call[KV_POSITIONS] = self.positions[shard]
        self.stats["computed"] += 1
        try:
            return self.v(q, k, v, scale=self.scale, backend=self.backend, return_lse=True, **call)
        except AttnLangError as e:
            raise _global_error(e, self.original, self.positions[self.rank], self.positions[shard]) from None

    def post(self, transfers):
        """Post one batch of transfers [(src, dst, send tensor or None, recv tensor or None, tag)] of this rank;
        every rank posts its batches in the same order (the ring's schedule), so each send meets its receive."""
        ops = []
        for src, dst, send, recv, tag in transfers:
            if src == self.rank and send is not None:
                ops.append(dist.P2POp(dist.isend, send, self.peer(dst), self.group, tag))
                self.stats["sends"] += 1
                self.stats["bytes_sent"] += send.numel() * send.element_size()
            elif dst == self.rank and recv is not None:
                ops.append(dist.P2POp(dist.irecv, recv, self.peer(src), self.group, tag))
        return dist.batch_isend_irecv(ops) if ops else []


_KV, _GRAD, _HOME = 1, 2, 3  # message tags: k / v shards, travelling dk / dv accumulators, accumulators going home


def _global_error(e: AttnLangError, original, q_positions, kv_positions=None) -> AttnLangError:
    """An error of a position variant's call as the user's variant would give it: global q_idx / kv_idx (the
    call's rows are gathered ones) and the caret under the user's expression, not the rewritten one."""
    def to_global(positions):
        def repl(m):
            i = int(m.group(2))
            ok = positions is not None and 0 <= i < len(positions)
            return f"{m.group(1)}={int(positions[i]) if ok else i}"
        return repl
    message = re.sub(r"\b(q_idx)=(\d+)", to_global(q_positions), e.message)
    message = re.sub(r"\b(kv_idx)=(\d+)", to_global(kv_positions), message)
    sources = getattr(getattr(original, "checked", None), "sources", {})
    if e.source is None or e.where not in sources:
        return AttnLangError(message, e.source, e.line, e.column, e.length, e.where)
    source = sources[e.where]
    return AttnLangError(message, source, 1, 1, len(source.split("\n")[0]), e.where)


def _pack(*ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[at:at + n].view(s))
        at += n
    return out


def _wait(reqs):
    for r in reqs:
        r.wait()


def _kv_shapes(k, v, n):
    return [(k.shape[0], k.shape[1], n, k.shape[3]), (v.shape[0], v.shape[1], n, v.shape[3])]


def _merge(out, lse, o, l):
    new = torch.logaddexp(lse, l)
    dead = new == -math.inf
    a = torch.where(dead, 0.0, torch.exp(lse - new))
    b = torch.where(dead, 0.0, torch.exp(l - new))
    return out * a[..., None] + o.to(out.dtype) * b[..., None], torch.where(dead, -math.inf, new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring: _Ring, q, k, v, *values):
        tensors = dict(zip(ring.names, values))
        W, rank, plan = ring.world, ring.rank, ring.plan
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(*q.shape[:3], v.shape[3], dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
        held = _pack(k, v)
        # lse as a single-process call gives it (API.md): float64 for float64 q, else float32; also on a rank
        # that computes no step (no rows, or no allowed key for any of its rows), which no partial result tells
        lse_dtype = acc
        keep = ring.keep and any(ctx.needs_input_grad[1:])
        kept = []
        failed = None          # a block's error: the ring goes on without computing, then it is raised
        if keep:
            need_t = _tensors_needing_grad(ring, ctx)
            qg = q.detach().requires_grad_(ctx.needs_input_grad[1])
            tg = {n: (x.detach().requires_grad_() if n in need_t else x) for n, x in tensors.items()}
        for t in range(W):
            s = (rank - t) % W
            transfers, recv = _kv_transfers(ring, k, v, held, t)
            reqs = ring.post(transfers)
            if plan.needed[rank, s] and failed is None:
                ks, vs = (k, v) if s == rank else _unpack(held, _kv_shapes(k, v, plan.lengths[s]))
                try:
                    if keep:
                        with torch.enable_grad():
                            kg, vg = ks.detach().requires_grad_(), vs.detach().requires_grad_()
                            o, l = ring.partial(qg, kg, vg, s, tg)
                        kept.append((s, o, l, kg, vg))
                        o, l = o.detach(), l.detach()
                    else:
                        o, l = ring.partial(q, ks, vs, s, tensors)
                    out, lse = _merge(out, lse, o, l.to(acc))
                except Exception as e:  # noqa: BLE001 -- raised after the ring, on every rank (see attention)
                    failed = e
            else:
                ring.stats["skipped"] += 1
            _wait(reqs)
            held = recv
        if failed is not None:
            # this rank's transfers are all done, so the other ranks finish their ring; attention() then tells
            # every rank
            raise failed
        ctx.ring = ring
        ctx.kept = (qg, tg, kept) if keep else None
        ctx.save_for_backward(q, k, v, out, lse, *values)
        return out.to(q.dtype), lse.to(lse_dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        ring: _Ring = ctx.ring
        q, k, v, out, lse, *values = ctx.saved_tensors
        tensors = dict(zip(ring.names, values))
        W, rank, plan = ring.world, ring.rank, ring.plan
        acc = out.dtype
        need_q, need_k, need_v = ctx.needs_input_grad[1:4]
        need_t = _tensors_needing_grad(ring, ctx)
        dout = torch.zeros_like(out) if dout is None else dout.to(acc)
        dlse = torch.zeros_like(lse) if dlse is None else dlse.to(acc)
        row = (dout * out).sum(-1)                     # <dout, out> per row
        if ctx.kept is not None:
            _, dq, dk, dv, *grads_t = _backward_kept(ring, ctx.kept, k, v, lse, dout, dlse, row, need_q, need_t)
            ctx.kept = None
            return (None, dq, dk if need_k else None, dv if need_v else None, *grads_t)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dt = {n: torch.zeros(tensors[n].shape, dtype=acc, device=q.device) for n in need_t}
        held = _pack(k, v)
        grad_of = None                                # this step's shard's accumulated dk / dv (packed, float)
        acc_reqs = []
        recv_acc = None
        for t in range(W):
            s, nxt = (rank - t) % W, (rank - t - 1) % W
            n_s = plan.lengths[s]
            transfers, recv = _kv_transfers(ring, k, v, held, t)
            reqs = ring.post(transfers)
            shapes = _kv_shapes(k, v, n_s)
            contribution = None
            if plan.needed[rank, s]:
                ks, vs = (k, v) if s == rank else _unpack(held, shapes)
                with torch.enable_grad():
                    qg = q.detach().requires_grad_(need_q)
                    kg = ks.detach().requires_grad_(True)
                    vg = vs.detach().requires_grad_(True)
                    tg = {n: (x.detach().requires_grad_(True) if n in need_t else x) for n, x in tensors.items()}
                    o, l = ring.partial(qg, kg, vg, s, tg)
                    do, dl = _step_grads(o, l, lse, dout, dlse, row, acc)
                    inputs = [kg, vg] + ([qg] if need_q else []) + [tg[n] for n in sorted(need_t)]
                    grads = torch.autograd.grad([o, l], inputs, [do, dl], allow_unused=True)
                gk, gv = (torch.zeros_like(x) if g is None else g for g, x in zip(grads[:2], (kg, vg)))
                contribution = _pack(gk.to(acc), gv.to(acc))
                rest = list(grads[2:])
                if need_q:
                    g = rest.pop(0)
                    if g is not None:
                        dq += g.to(acc)
                for n in sorted(need_t):
                    g = rest.pop(0)
                    if g is not None:
                        dt[n] += g.to(acc)
            # the accumulator of shard s arrives from the previous holder (posted in the last step's second batch)
            _wait(acc_reqs)
            if t == 0:
                grad_of = contribution
            else:
                grad_of = recv_acc
                if contribution is not None:
                    grad_of = contribution if grad_of is None else grad_of + contribution
            # second batch: pass the accumulator on, or home when no later rank needs the shard
            transfers2, recv_acc = [], None
            if t + 1 < W and plan.last_step[nxt] >= t + 1:
                recv_acc = torch.empty(_kv_numel(k, v, plan.lengths[nxt]), dtype=acc, device=k.device)
                transfers2.append(((rank - 1) % W, rank, None, recv_acc, _GRAD))
            if plan.last_step[s] >= t + 1:
                transfers2.append((rank, (rank + 1) % W, _or_zeros(grad_of, k, v, n_s, acc), None, _GRAD))
            elif plan.last_step[s] == t and t >= 1:
                # the last rank to need shard s sends its accumulator home
                transfers2.append((rank, s, _or_zeros(grad_of, k, v, n_s, acc), None, _HOME))
                ring.stats["returns"] += 1
            last_own = plan.last_step[rank]
            if t == 0 and last_own <= 0:
                own = _or_zeros(grad_of, k, v, n_s, acc)
            elif last_own == t and t >= 1:
                own = torch.empty(_kv_numel(k, v, plan.lengths[rank]), dtype=acc, device=k.device)
                transfers2.append(((rank + last_own) % W, rank, None, own, _HOME))
            _wait(reqs)
            acc_reqs = ring.post(transfers2)
            held = recv
        _wait(acc_reqs)
        dk, dv = _unpack(own, _kv_shapes(k, v, plan.lengths[rank]))
        for n in sorted(need_t):
            dist.all_reduce(dt[n], group=ring.group)
        grads_t = [dt[n].to(tensors[n].dtype) if n in need_t else None for n in ring.names]
        return (None, dq.to(q.dtype) if need_q else None, dk.to(k.dtype) if need_k else None,
                dv.to(v.dtype) if need_v else None, *grads_t)


def _step_grads(o, l, lse, dout, dlse, row, acc):
    """Gradients to one step's (o_i, lse_i) from those to the merged (out, lse): d out / d o_i = w_i and
    d out / d lse_i = w_i (o_i - out), w_i = exp(lse_i - lse)."""
    w = torch.where(lse == -math.inf, 0.0, torch.exp(l.detach().to(acc) - lse))
    do = (w[..., None] * dout).to(o.dtype)
    dl = w * ((dout * o.detach().to(acc)).sum(-1) - row + dlse)
    return do, dl.to(l.dtype)


def _backward_kept(ring: _Ring, kept, k, v, lse, dout, dlse, row, need_q, need_t):
    """The backward from the graphs the forward kept: one autograd pass over every step, then each shard's dk / dv
    goes straight to its owner."""
    qg, tg, steps = kept
    acc = lse.dtype
    outputs, grad_outputs = [], []
    for _, o, l, _, _ in steps:
        do, dl = _step_grads(o, l, lse, dout, dlse, row, acc)
        outputs += [o, l]
        grad_outputs += [do, dl]
    inputs = [x for _, _, _, kg, vg in steps for x in (kg, vg)]
    inputs += ([qg] if need_q else []) + [tg[n] for n in sorted(need_t)]
    # a rank that computed no step (no rows, or no allowed key for any of them) has no graph: zero gradients
    grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)) if outputs else \
        [None] * len(inputs)
    rank, W, plan = ring.rank, ring.world, ring.plan
    own = torch.zeros(_kv_numel(k, v, plan.lengths[rank]), dtype=acc, device=k.device)
    transfers, received = [], []
    for i, (s, _, _, kg, vg) in enumerate(steps):
        gk, gv = (torch.zeros_like(x) if g is None else g for g, x in zip(grads[2 * i:2 * i + 2], (kg, vg)))
        packed = _pack(gk.to(acc), gv.to(acc))
        if s == rank:
            own += packed
        else:
            transfers.append((rank, s, packed, None, _HOME))
            ring.stats["returns"] += 1
    for r in range(W):
        if r != rank and plan.needed[r, rank]:
            buf = torch.empty_like(own)
            received.append(buf)
            transfers.append((r, rank, None, buf, _HOME))
    transfers.sort(key=lambda x: (x[0], x[1]))            # the same order on every rank
    reqs = ring.post(transfers)
    rest = grads[2 * len(steps):]
    dq = rest.pop(0) if need_q else None
    if need_q and dq is None:
        dq = torch.zeros_like(qg)
    dt = {}
    for n in sorted(need_t):
        g = rest.pop(0)
        dt[n] = (torch.zeros_like(tg[n]) if g is None else g).to(acc).contiguous()
    _wait(reqs)
    for buf in received:
        own += buf
    dk, dv = _unpack(own, _kv_shapes(k, v, plan.lengths[rank]))
    for n in sorted(need_t):
        dist.all_reduce(dt[n], group=ring.group)
    q_dtype = qg.dtype
    grads_t = [dt[n].to(tg[n].dtype) if n in need_t else None for n in ring.names]
    return (None, None if dq is None else dq.to(q_dtype), dk.to(k.dtype), dv.to(v.dtype), *grads_t)


def _keep_graphs(plan: CommPlan) -> bool:
    """Whether every rank's remote shards that it computes with hold at most KEEP_FACTOR x its own positions:
    then keeping the forward's graphs costs little memory and saves the backward's recompute and k / v ring.
    Decided from the plan alone, so every rank decides alike."""
    for r in range(plan.world_size):
        remote = sum(plan.lengths[s] for s in range(plan.world_size) if s != r and plan.needed[r, s])
        if remote > KEEP_FACTOR * plan.lengths[r]:
            return False
    return True


def _kv_transfers(ring, k, v, held, t: int):
    """Step ``t`` of the k / v ring, forward and backward alike: (transfers for ``ring.post``, the buffer this rank
    receives the next step's shard into, or None). A shard is received only if this rank computes with it at a
    later step, and passed on only while a later rank does (``plan.last_step``)."""
    W, rank, plan = ring.world, ring.rank, ring.plan
    s, nxt = (rank - t) % W, (rank - t - 1) % W
    transfers, recv = [], None
    if t + 1 < W:
        if plan.last_step[nxt] >= t + 1:
            recv = torch.empty(_kv_numel(k, v, plan.lengths[nxt]), dtype=k.dtype, device=k.device)
            transfers.append(((rank - 1) % W, rank, None, recv, _KV))
        if plan.last_step[s] >= t + 1:
            transfers.append((rank, (rank + 1) % W, held, None, _KV))
    return transfers, recv


def _tensors_needing_grad(ring, ctx) -> set:
    """Names of the floating named tensors whose gradient autograd asks for (inputs 4.. of the ring function)."""
    return {n for n, need in zip(ring.names, ctx.needs_input_grad[4:]) if need and n in ring.grad_names}


def _kv_numel(k, v, n: int) -> int:
    """Elements of a packed k / v shard (or of its dk / dv) of n positions."""
    return n * (k.shape[0] * k.shape[1] * k.shape[3] + v.shape[0] * v.shape[1] * v.shape[3])


def _or_zeros(buf, k, v, n: int, dtype):
    return buf if buf is not None else torch.zeros(_kv_numel(k, v, n), dtype=dtype, device=k.device)


def attention(v, q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, *,
              positions: Sequence[torch.Tensor], group=None, backend: str = "auto", return_lse: bool = True,
              scale: float | None = None, comm_stats: dict | None = None, recompute: bool | None = None,
              **tensors):
    """Context-parallel self-attention: this rank's rows of ``v(q, k, v_, **tensors)``.

    Args:
        v: the Variant. q_local: [B, Hq, len(positions[rank]), D]; k_local, v_local: [B, Hkv, len(positions[rank]),
            D / Dv]: the rows of q / k / v at positions[rank] (any float dtype the backend takes, one device).
        positions: the list of W shards (``shard_positions``), the same on every rank.
        group: the process group (default: the world); gloo on the CPU, NCCL on GPUs.
        backend: what runs each block, as ``Variant.__call__``'s backend=. return_lse: also return lse.
        scale: as ``Variant.__call__``'s scale=.
        comm_stats: a dict to fill with this call's counts (forward ring): computed / skipped steps, sends,
            bytes_sent; the backward adds returns and its own sends.
        recompute: True: the backward recomputes each step and runs the ring again (memory of one shard at a
            time); False: the forward keeps each step's graph and the backward sends each dk / dv straight home.
            None (default): False where the remote shards each rank computes with hold at most 1.5x its own
            positions (2 ranks; sliding windows), else True.
        **tensors: the variant's tensors, global (``doc`` is ``[S]``), the same on every rank.
    Returns:
        out [B, Hq, len(positions[rank]), Dv] in q's dtype (and lse [B, Hq, len(positions[rank])], natural log,
        float32, float64 when q is float64, as a single-process call gives it): the rows at positions[rank] of the
        single-process result, on a rank with no rows too (W > S: empty tensors), and with B or Hq of 0 (empty
        tensors on every rank, zero gradients, nothing sent). Autograd reaches q_local, k_local, v_local and
        floating named tensors (their gradient summed over ranks, the same on every rank).
        The backward is collective too: every rank of the group backpropagates through its out (a rank whose
        loss leaves out aside would leave the others waiting; its out may be multiplied by 0).
    Raises:
        AttnLangError: on every rank when any rank's input is bad: positions that are not a permutation or do not
            match the shards' lengths, tensors the variant cannot read at the global length, ranks that disagree
            on the variant, positions, shapes, dtypes, the named tensors' values or which inputs require grad,
            a group this process is not a member of, or a backend that cannot run a block; an error of one
            rank's blocks (a NaN score, a NaN sink) is raised on every rank.
    """
    if group is None:
        group = dist.group.WORLD
    if not dist.is_available() or not dist.is_initialized():
        raise AttnLangError("attnlang.distributed.attention needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group)")
    rank, world, pos = _agree(v, q_local, k_local, v_local, positions, group, backend, scale, tensors,
                              (return_lse, recompute, comm_stats))
    if not (q_local.shape[0] and q_local.shape[1]):
        # batch or query heads of 0 (on every rank: the ranks agreed on the shapes): no row on any rank, nothing
        # to send; zero gradients, with no all_reduce in the backward (every rank's is zero)
        from .variant import with_zero_grads
        acc = torch.float64 if q_local.dtype == torch.float64 else torch.float32
        B, Hq, rows, _ = q_local.shape
        out, lse = with_zero_grads(q_local.new_zeros((B, Hq, rows, v_local.shape[3])),
                                   torch.empty((B, Hq, rows), dtype=acc, device=q_local.device),
                                   (q_local, k_local, v_local, *(tensors[n] for n in sorted(tensors))), return_lse)
        return (out, lse) if return_lse else out
    S = sum(len(p) for p in pos)
    key = _plan_key(v, pos, q_local.shape[0], q_local.shape[1], tensors)
    plan = _cached_plan(key, lambda: _plan(v, pos, q_local.shape[0], q_local.shape[1], tensors))
    names = tuple(sorted(tensors))
    stats = comm_stats if comm_stats is not None else {}
    for field in ("computed", "skipped", "sends", "bytes_sent", "returns"):
        stats.setdefault(field, 0)
    ring = _Ring(v=position_variant(v, S), group=group, rank=rank, world=world,
                 positions=_device_positions(pos, q_local.device), plan=plan, backend=backend, scale=scale,
                 names=names, grad_names=tuple(n for n in names if tensors[n].is_floating_point()), stats=stats,
                 keep=_keep_graphs(plan) if recompute is None else not recompute, original=v)
    error = None
    try:
        out, lse = _RingAttention.apply(ring, q_local, k_local, v_local, *(tensors[n] for n in names))
        if v.sink is not None or not v.normalize:
            out, lse = _denominator(v, S, out, lse, q_local, ring.positions[rank], group, tensors)
    except Exception as e:  # noqa: BLE001 -- told to every rank, then raised
        error = e
    _agree_on_errors(error, group, rank, world, q_local.device)
    return (out, lse) if return_lse else out


def _agree_on_errors(error, group, rank: int, world: int, device) -> None:
    """After the forward: an error on any rank (a NaN score where one rank's rows meet it, a backend refusing a
    block, a sink that is NaN) is an AttnLangError on every rank, never one rank raising while the others go on
    to wait for it in their next collective (the backward's ring, say). One 4-byte all_reduce, read on the host
    (on CUDA: one device synchronisation per call); the messages travel only when some rank failed."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    message = None if error is None else (str(error) if isinstance(error, AttnLangError)
                                           else f"{type(error).__name__}: {error}")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, message, group=group)
    failed = [r for r, m in enumerate(gathered) if m is not None]
    where = f"context-parallel attention failed on rank {', '.join(map(str, failed))}"
    if error is None:
        raise AttnLangError(f"{where}; rank {failed[0]}: {gathered[failed[0]]}")
    if isinstance(error, AttnLangError):
        raise AttnLangError(f"{where}: {error.message}", error.source, error.line, error.column, error.length,
                            error.where) from None
    raise error


class _SumOverRanks(torch.autograd.Function):
    """Identity; the backward sums the gradient over the ranks (a tensor every rank holds whole)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _denominator(v, S, out, lse, q, positions, group, tensors):
    """The sink and normalize=False on the merged softmax over every allowed key (as attnlang.denominator does for
    a single-process call): the sink enters once, after the ring; its tensors' gradients are summed over ranks."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    o, l = out.to(acc), lse.to(acc)
    if not v.normalize:
        o = o * torch.exp(l).unsqueeze(-1)       # the numerator: sum over allowed keys of exp(s'') V
        check_numerator(o, l, q.dtype)
    if v.sink is not None:
        sv = sink_variant(v, S)
        wanted = set(sv.tensor_names)
        call = {n: (_SumOverRanks.apply(t, group) if t.requires_grad else t) for n, t in tensors.items()
                if n in wanted}
        if Q_POSITIONS in wanted:
            call[Q_POSITIONS] = positions
        B, H, n, D = q.shape
        k1 = torch.zeros(B, 1, 1, D, dtype=q.dtype, device=q.device)   # the mask allows no key: any one will do
        v1 = torch.zeros(B, 1, 1, 1, dtype=q.dtype, device=q.device)
        qs = q.detach()
        if n == 0:
            # a rank without rows (W > S): the sink of one stand-in row, sliced away, so that its tensors are still
            # in this rank's graph and their all_reduce in the backward runs here as on every other rank
            qs = torch.zeros(B, H, 1, D, dtype=q.dtype, device=q.device)
            if Q_POSITIONS in call:
                call[Q_POSITIONS] = torch.zeros(1, dtype=positions.dtype, device=positions.device)
        try:
            _, sink = sv(qs, k1, v1, backend="eager", return_lse=True, **call)
        except AttnLangError as e:
            raise _global_error(e, v, positions) from None
        sink = sink[:, :, :n].to(acc)
        zero = torch.zeros((), dtype=acc, device=q.device)
        none = (l == -math.inf) & (sink == -math.inf)     # neither a key nor a sink: lse -inf, out 0
        a, b = torch.where(none, zero, l), torch.where(none, zero, sink)
        both = torch.logaddexp(a, b)
        if v.normalize:
            o = o * torch.where(none, zero, torch.exp(a - both)).unsqueeze(-1)
        l = torch.where(none, torch.full((), -math.inf, dtype=acc, device=q.device), both)
    return o.to(out.dtype), l.to(lse.dtype)
