"""CPU benchmark: attnlang's analytic block sparsity against torch's create_block_mask (which evaluates the mask on
every position), 128 x 128 blocks, one batch and head.

    python benchmarks/bench_sparsity.py [--max-s 1048576] [--cbm-max-s 16384] [--out benchmarks/results]
    python benchmarks/bench_sparsity.py --frontend-only     # adds the front-end timings to the existing results
    python benchmarks/bench_sparsity.py --sizes 4096,16384,65536,262144 --variants all --name sparsity_cpu_after

Writes sparsity_cpu.json and sparsity_cpu.md (``--name`` for other file names). Times are medians of repeated
calls after one warm-up call. Also times the front end (check, and simplify alone) on the BENCHMARKS.md variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import attnlang as al

VARIANTS = {
    "causal": ("q_idx >= kv_idx", None),
    "sliding_window": ("0 <= q_idx - kv_idx < 1024", None),
    "document": ("doc[q_idx] == doc[kv_idx]", "doc"),
    "prefix_lm": ("kv_idx < 1024 | q_idx >= kv_idx", None),
    # not in the default set: masks the exact affine path does not decide, so the generic interval arithmetic runs
    "document_1000": ("doc[q_idx] == doc[kv_idx]", "doc1000"),   # documents every 1000 tokens, unaligned
    "chunked_causal": ("q_idx // 1000 == kv_idx // 1000 & q_idx >= kv_idx", None),
    "dilated_window": ("abs(q_idx - kv_idx) <= 1024 & (q_idx - kv_idx) % 4 == 0", None),
    "exp_cutoff": ("exp(-0.01 * float(q_idx - kv_idx)) > 0.001 & q_idx >= kv_idx", None),
}
DEFAULT_VARIANTS = ("causal", "sliding_window", "document", "prefix_lm")


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flex_mask_mod(name, doc):
    if name == "causal":
        return lambda b, h, q, k: q >= k
    if name == "sliding_window":
        return lambda b, h, q, k: (q - k >= 0) & (q - k < 1024)
    if name in ("document", "document_1000"):
        return lambda b, h, q, k: doc[q] == doc[k]
    if name == "chunked_causal":
        return lambda b, h, q, k: (q // 1000 == k // 1000) & (q >= k)
    if name == "dilated_window":
        return lambda b, h, q, k: ((q - k).abs() <= 1024) & ((q - k) % 4 == 0)
    if name == "exp_cutoff":
        return lambda b, h, q, k: (torch.exp(-0.01 * (q - k).float()) > 0.001) & (q >= k)
    return lambda b, h, q, k: (k < 1024) | (q >= k)


FRONTEND = {
    "causal": ("score", "q_idx >= kv_idx"),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < 1024"),
    "alibi_causal": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx"),
    "softcap_causal": ("30 * tanh(score / 30)", "q_idx >= kv_idx"),
    "document": ("score", "doc[q_idx] == doc[kv_idx]"),
}


def frontend() -> dict:
    """Median microseconds of parse + check, and of simplify alone, per variant (no compile cache involved)."""
    from attnlang.check import check
    from attnlang.simplify import simplify_variant
    out = {}
    for name, (score, mask) in FRONTEND.items():
        c = check(score, mask)
        t_check = _median_time(lambda: check(score, mask), 200)
        t_simp = _median_time(lambda: simplify_variant(c.score, c.mask), 200)
        out[name] = {"parse_check_us": round(t_check * 1e6, 1), "simplify_us": round(t_simp * 1e6, 1)}
        print(name, out[name], flush=True)
    return out


def _frontend_md(fe: dict) -> list[str]:
    lines = ["", "## Front end (median of 200 calls, microseconds)", "",
             "| variant | parse + check | simplify |", "|---|---|---|"]
    for name, r in fe.items():
        lines.append(f"| {name} | {r['parse_check_us']} | {r['simplify_us']} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-s", type=int, default=1 << 20)
    p.add_argument("--cbm-max-s", type=int, default=16384, help="largest S for create_block_mask on the CPU")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--frontend-only", action="store_true")
    p.add_argument("--name", default="sparsity_cpu", help="base name of the .json / .md written")
    p.add_argument("--sizes", default=None, help="comma-separated S values (default: powers of 2 up to --max-s)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, or 'all' ({', '.join(VARIANTS)})")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per attnlang cell (default 5, 3 past 128k)")
    args = p.parse_args()
    if args.frontend_only:
        path = os.path.join(args.out, f"{args.name}.json")
        with open(path) as f:
            result = json.load(f)
        result["frontend"] = frontend()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, f"{args.name}.md"), "a") as f:
            f.write("\n".join(_frontend_md(result["frontend"])) + "\n")
        return
    from torch.nn.attention.flex_attention import create_block_mask

    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    else:
        sizes = [s for s in (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576) if s <= args.max_s]
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    rows = []
    for name in names:
        mask, tensor = VARIANTS[name]
        v = al.compile(mask=mask)
        for S in sizes:
            kw = {}
            if tensor == "doc":
                kw = {"doc": torch.arange(S) // (S // 8)}
            elif tensor == "doc1000":
                kw = {"doc": torch.arange(S) // 1000}
            repeat = args.repeat or (5 if S <= 131072 else 3)
            t_al = _median_time(lambda: v.block_sparsity(S, S, **kw), repeat)
            bs = v.block_sparsity(S, S, **kw)
            row = {"variant": name, "S": S, "attnlang_ms": round(t_al * 1e3, 3), "density": round(bs.density, 6),
                   **bs.counts()}
            if S <= args.cbm_max_s:
                mm = _flex_mask_mod(name, kw.get("doc"))
                t_cbm = _median_time(lambda: create_block_mask(mm, 1, 1, S, S, device="cpu"), 3 if S <= 8192 else 1)
                bm = create_block_mask(mm, 1, 1, S, S, device="cpu")
                # same block structure: create_block_mask's partial and full counts against ours
                same = (int(bm.kv_num_blocks.sum()) == bs.counts()["partial"]
                        and int(bm.full_kv_num_blocks.sum()) == bs.counts()["full"])
                row.update(create_block_mask_ms=round(t_cbm * 1e3, 3), speedup=round(t_cbm / t_al, 1),
                           same_blocks=same)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": "cpu", "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "block_size": [128, 128],
              "note": "medians after a warm-up call; the CPU was shared with other jobs while measured",
              "rows": rows, "frontend": frontend()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# Block sparsity on the CPU (128x128 blocks, B=H=1)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians after warm-up. "
             "create_block_mask only up to the S it fits in time here. The 2-core CPU was shared with other jobs "
             "while measured: isolated spikes (a larger time at a smaller S) are that contention. "
             "`density` is computed lazily, outside the timed call.", "",
             "| variant | S | attnlang ms | create_block_mask ms | speedup | same blocks | full | partial | empty |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['S']} | {r['attnlang_ms']} | {r.get('create_block_mask_ms', '')} | "
                     f"{r.get('speedup', '')} | {r.get('same_blocks', '')} | {r['full']} | {r['partial']} | "
                     f"{r['empty']} |")
    lines += _frontend_md(result["frontend"])
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
