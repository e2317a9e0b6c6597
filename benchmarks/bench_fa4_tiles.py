"""Which FA4 forward tile (tile_m x tile_n) and pipeline flags suit each benchmark variant on this GPU?

FA4's Python interface picks 128x128 (RS + intra-warpgroup overlap) for head dim 128 on Hopper, whatever the
expression; its C++ ancestor (FA3) used 128x176 for non-causal head dim 128. attnlang knows the whole variant,
so it could pick a tile per variant class if one measurably wins. This script measures the forward of each
variant through ``flash_attn.cute.interface._flash_attn_fwd`` with attnlang's own lowering (the same modifiers,
flags and tile lists as backend="fa4") and each candidate configuration; outputs are checked against the default
configuration's (a configuration the kernel computes wrongly is reported, not timed).

    python benchmarks/bench_fa4_tiles.py --out benchmarks/results    # B=4 H=16 S=8192 D=128 bf16
Writes <out>/fa4_tiles.json and .md. Compiles run first in --workers fresh processes (FA4's disk cache keeps them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import VARIANTS, named_tensors  # noqa: E402

CONFIGS = {  # name -> extra _flash_attn_fwd arguments
    "default": {},
    "128x176": {"tile_mn": (128, 176)},
    "128x192": {"tile_mn": (128, 192)},
    "128x160": {"tile_mn": (128, 160)},
    "192x128": {"tile_mn": (192, 128)},
    "128x128_no_rs": {"tile_mn": (128, 128), "mma_pv_is_rs": False},
}


def forward(name, config, q, k, v, S, H):
    """A no-argument callable running attnlang's lowering of ``name`` with ``config``, and the output buffer."""
    import attnlang as al
    from attnlang.backends import fa4
    score, mask = VARIANTS[name]
    variant = al.compile(score=score, mask=mask)
    tensors = named_tensors(name, S, H, "cuda")
    with torch.no_grad():
        plan = variant._plan(q, k, v, None, "fa4", False, None, tensors)
        _, _, kwargs = fa4.kernel_arguments(q, k, v, plan)
    for drop in ("score_mod_bwd", "block_sparse_tensors_bwd"):
        kwargs.pop(drop)
    left, right = kwargs.pop("window_size")
    kwargs.update(window_size_left=left, window_size_right=right, **CONFIGS[config])
    fa = fa4._flash()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: fa._flash_attn_fwd(qt, kt, vt, **kwargs)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=["full", "causal", "alibi_causal", "softcap_causal"])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--shape", type=int, nargs=4, default=(4, 16, 8192, 128), metavar=("B", "H", "S", "D"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--compile-only", help=argparse.SUPPRESS)  # worker mode: JSON list of [variant, config]
    args = ap.parse_args(argv)
    from attnlang.backends import fa4
    fa4._flash()
    B, H, S, D = args.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    jobs = [(n, c) for n in args.variants for c in args.configs]
    if args.compile_only:
        for name, config in json.loads(args.compile_only):
            try:
                forward(name, config, q, k, v, S, H)()
            except Exception as e:
                print(f"compile {name}/{config}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        return
    base = [sys.executable, str(Path(__file__).resolve()), "--shape", *map(str, args.shape)]
    procs = [subprocess.Popen(base + ["--compile-only", json.dumps(jobs[i::args.workers])])
             for i in range(args.workers) if jobs[i::args.workers]]
    for p in procs:
        p.wait(timeout=900)
    from triton.testing import do_bench
    results: dict = {}
    reference: dict = {}
    for rnd in range(args.rounds):
        for name in args.variants:
            configs = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
            for config in configs:
                row = results.setdefault(name, {}).setdefault(config, {"fwd_ms_samples": []})
                if "error" in row:
                    continue
                try:
                    fn = forward(name, config, q, k, v, S, H)
                    out = fn()
                    if name not in reference:
                        reference[name] = forward(name, "default", q, k, v, S, H)().float()
                    err = float((out.float() - reference[name]).abs().max())
                    row["max_abs_diff_vs_default"] = err
                    if err > 2e-2:
                        row["error"] = f"output differs from the default configuration's by {err:.3g}"
                        continue
                    row["fwd_ms_samples"].append(round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"[round {rnd + 1}] {name:15s} {config:14s} {row}", flush=True)
    for _name, rows in results.items():
        for row in rows.values():
            xs = sorted(row["fwd_ms_samples"])
            if xs:
                row["fwd_ms"] = xs[len(xs) // 2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "shape": dict(zip("BHSD", args.shape)), "configs": CONFIGS,
           "variants": results}
    (out / "fa4_tiles.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    lines = [f"# FA4 forward tile configurations, {doc['device']}, B,H,S,D = {tuple(args.shape)} bf16", "",
             f"Median of {args.rounds} rounds (rotated order) of do_bench medians, ms; blank: not run or wrong.", "",
             "| variant | " + " | ".join(args.configs) + " |", "|---" * (len(args.configs) + 1) + "|"]
    for _name, rows in results.items():
        cells = [f"{rows[c]['fwd_ms']:.3f}" if "fwd_ms" in rows.get(c, {}) else rows.get(c, {}).get("error", "")[:40]
                 for c in args.configs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "fa4_tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
