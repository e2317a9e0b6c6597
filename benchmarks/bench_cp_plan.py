"""The context-parallel communication plan at scale, on the CPU, without running attention.

For each mask and world size: the layout shard_positions picks, its balance (max / mean allowed pairs per rank),
and the ring's traffic from plan_communication: bytes each rank sends in the forward and the backward, ring steps
computed and skipped, and sends of a full ring left out. Bytes are for B=1, Hkv=8, D=128 bf16 (k + v: 4096 bytes per
position; the backward's dk / dv travel in float32).

    python benchmarks/bench_cp_plan.py                       # S = 1M, 8 to 64 ranks
    python benchmarks/bench_cp_plan.py --seq-len 131072 --worlds 2 4 8

Writes benchmarks/results/cp_plan.json and cp_plan.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import attnlang as al
import attnlang.distributed as ald

RESULTS = Path(__file__).resolve().parent / "results"
KV_BYTES_PER_TOKEN = 2 * 8 * 128 * 2      # k and v, Hkv = 8, D = 128, bf16
GRAD_BYTES_PER_TOKEN = 2 * 8 * 128 * 4    # dk and dv accumulators in float32


def document_ids(seq_len: int, seed: int = 0, longest: int | None = None, most: int | None = None) -> torch.Tensor:
    """Documents of very unequal lengths: one of ``longest`` (default S/4) positions, the rest log-uniform in
    [128, ``most``] (default S/16), shuffled."""
    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len // 4 if longest is None else longest]
    most = seq_len // 16 if most is None else most
    while sum(lengths) < seq_len:
        lo, hi = 7.0, float(torch.log2(torch.tensor(float(most))))
        lengths.append(int(2 ** (lo + (hi - lo) * float(torch.rand(1, generator=g)))))
    lengths[-1] -= sum(lengths) - seq_len
    order = torch.randperm(len(lengths), generator=g)
    lengths = torch.tensor(lengths)[order]
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def masks(seq_len: int):
    doc = document_ids(seq_len)
    return {
        "causal": (al.compile(mask="q_idx >= kv_idx"), {}),
        "sliding_window_4096": (al.compile(mask="0 <= q_idx - kv_idx < 4096"), {}),
        "documents": (al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"), {"doc": doc}),
        "short_documents": (al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"),
                            {"doc": document_ids(seq_len, seed=1, longest=8192, most=8192)}),
        "prefix_lm_65536": (al.compile(mask="kv_idx < 65536 | q_idx >= kv_idx"), {}),
        "full": (al.compile(), {}),
    }


def layout_name(positions, chunk: int) -> str:
    seq_len, world = sum(len(p) for p in positions), len(positions)
    single_runs = all(len(p) == 0 or int(p[-1]) - int(p[0]) + 1 == len(p) for p in positions)
    if single_runs:
        lengths = [len(p) for p in positions]
        return "contiguous" if max(lengths) - min(lengths) <= chunk else "contiguous_by_work"
    zig = ald._zigzag(torch.zeros(-(-seq_len // chunk)), world)
    if all(torch.equal(p, ald._chunk_positions(c, chunk, seq_len)) for p, c in zip(positions, zig)):
        return "zigzag"
    return "per_document"


def run(seq_len: int, worlds: list[int]) -> list[dict]:
    rows = []
    for name, (v, tensors) in masks(seq_len).items():
        for world in worlds:
            t0 = time.perf_counter()
            positions = ald.shard_positions(v, seq_len, world, **tensors)
            t_shard = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = ald.plan_communication(v, positions, **tensors)
            t_plan = time.perf_counter() - t0
            work = ald.rank_work(v, positions, **tensors)
            fwd = plan.bytes_sent(KV_BYTES_PER_TOKEN)
            bwd = plan.bytes_sent(KV_BYTES_PER_TOKEN, backward=True, grad_bytes_per_token=GRAD_BYTES_PER_TOKEN)
            full_ring = (world - 1) * (seq_len // world) * KV_BYTES_PER_TOKEN
            computed = plan.computed_steps()
            rows.append({
                "mask": name, "seq_len": seq_len, "world_size": world,
                "layout": layout_name(positions, ald.chunk_size(seq_len, world)),
                "chunk": ald.chunk_size(seq_len, world),
                "balance": max(work) / statistics.mean(work) if statistics.mean(work) else 1.0,
                "tokens_per_rank_max": max(plan.lengths), "tokens_per_rank_min": min(plan.lengths),
                "fwd_bytes_per_rank_max": max(fwd), "fwd_bytes_per_rank_mean": statistics.mean(fwd),
                "bwd_bytes_per_rank_max": max(bwd), "full_ring_fwd_bytes_per_rank": full_ring,
                "steps_computed_mean": statistics.mean(computed),
                "steps_skipped_mean": world - statistics.mean(computed),
                "transfers_skipped": plan.transfers_skipped(), "transfers_full_ring": world * (world - 1),
                "shard_positions_s": t_shard, "plan_s": t_plan,
            })
            r = rows[-1]
            print(f"{name:22s} W={world:3d} {r['layout']:12s} balance {r['balance']:.4f} fwd max "
                  f"{r['fwd_bytes_per_rank_max'] / 2**20:9.1f} MiB (full ring {full_ring / 2**20:9.1f}) skipped "
                  f"{r['transfers_skipped']}/{r['transfers_full_ring']} sends, {r['steps_skipped_mean']:.1f} steps "
                  f"({t_shard:.2f} s + {t_plan:.2f} s)", flush=True)
    return rows


def write(rows: list[dict], seq_len: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "grad_bytes_per_token": GRAD_BYTES_PER_TOKEN}
    (RESULTS / "cp_plan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Context-parallel communication plan (S = {seq_len}, CPU, no attention run)", "",
             "Computed by `benchmarks/bench_cp_plan.py` from the masks' block sparsity: the layout shard_positions "
             "picks, the balance of allowed (q, kv) pairs per rank (max / mean), and the ring's traffic per rank "
             "for B=1, Hkv=8, D=128 bf16 k / v (4 KiB per position; the backward adds float32 dk / dv and their "
             "return home). `full ring` is what a ring without skipping sends per rank in the forward. "
             "documents: one of S/4 positions, the rest log-uniform in [128, S/16], shuffled (seed 0); "
             "short_documents: log-uniform in [128, 8192] (seed 1).", "",
             "| mask | W | layout | balance | tokens/rank min..max | fwd MiB/rank max | full ring MiB | bwd MiB/rank "
             "max | steps skipped (mean) | sends skipped | shard s | plan s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['world_size']} | {r['layout']} | {r['balance']:.4f} | "
                     f"{r['tokens_per_rank_min']}..{r['tokens_per_rank_max']} | "
                     f"{r['fwd_bytes_per_rank_max'] / 2**20:.1f} | {r['full_ring_fwd_bytes_per_rank'] / 2**20:.1f} | "
                     f"{r['bwd_bytes_per_rank_max'] / 2**20:.1f} | {r['steps_skipped_mean']:.2f} of "
                     f"{r['world_size']} | {r['transfers_skipped']} of {r['transfers_full_ring']} | "
                     f"{r['shard_positions_s']:.2f} | {r['plan_s']:.2f} |")
    (RESULTS / "cp_plan.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    rows = run(args.seq_len, args.worlds)
    if not args.no_write:
        write(rows, args.seq_len)


if __name__ == "__main__":
    main()
