"""FA4's forward tile at decode shapes: is the 128-row query tile (filled with q_len * Hq / Hkv real rows under
pack_gqa) what makes decode rel_table slow? Calls FA4's ``_flash_attn_fwd`` with attnlang's own kernel arguments
for the suite's decode variants and a list of ``tile_mn`` overrides, times each with do_bench and checks each
against a float64 eager reference (max |err| / max |ref| of out, bound 8u, u = 2^-8).

``python benchmarks/decode_tiles.py --out DIR`` writes DIR/decode_tiles.{json,md}."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SUITE_GROUPS, suite_tensors, suite_variant  # noqa: E402

TILES = (None, (64, 128), (64, 64), (128, 64))
BOUND = 8 * 2.0 ** -8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--groups", nargs="*", default=["decode_q1", "decode_q16"])
    ap.add_argument("--variants", nargs="*", default=["rel_table", "alibi", "causal", "softcap"])
    ap.add_argument("--head-dim", type=int, default=None, help="D instead of the group's (128)")
    ap.add_argument("--name", default="decode_tiles", help="file stem of the results")
    args = ap.parse_args()
    from triton.testing import do_bench

    import attnlang as al
    import attnlang.backends.fa4 as fa4
    fa = fa4._flash()
    rows = []
    for gname in args.groups:
        g = dict(SUITE_GROUPS[gname], **({"D": args.head_dim} if args.head_dim else {}))
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(g["B"], g["Hq"], g["Sq"], g["D"], device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(g["B"], g["Hkv"], g["Skv"], g["D"], device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        for name in args.variants:
            score, mask = suite_variant(name, g)
            variant = al.compile(score=score, mask=mask)
            tensors = suite_tensors(name, g, "cuda")
            ref = variant(q.double(), k.double(), v.double(), backend="eager",
                          **{n: t.double() for n, t in tensors.items()})
            plan = variant._plan(q, k, v, None, "fa4", False, None, tensors)
            _, _, kwargs = fa4.kernel_arguments(q, k, v, plan)
            fwd = fa4._forward_arguments(kwargs)[0]
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            for tile in TILES:
                row = {"group": gname, "D": g["D"], "variant": name, "tile_mn": tile}
                try:
                    def call(t=tile):
                        return fa._flash_attn_fwd(qt, kt, vt, tile_mn=t, **fwd)
                    out = call()[0].transpose(1, 2)
                    err = float((out.double() - ref).abs().max() / ref.abs().max())
                    row.update(err=err, ok=bool(err <= BOUND),
                               ms=do_bench(call, warmup=25, rep=100, return_mode="median"))
                except Exception as e:  # a tile FA4 refuses or fails to compile: recorded, not fatal
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                print(json.dumps(row), flush=True)
            row = {"group": gname, "D": g["D"], "variant": name, "tile_mn": "attnlang"}
            row["ms"] = do_bench(lambda: variant(q, k, v, backend="fa4", **tensors), warmup=25, rep=100,
                                 return_mode="median")
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    lines = ["# FA4 forward tile_mn at decode shapes (attnlang's kernel arguments), H200", "",
             "| group | D | variant | tile_mn | ms | err / max ref | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else r.get("error", "")
        lines.append(f"| {r['group']} | {r['D']} | {r['variant']} | {r['tile_mn']} | {ms} | {r.get('err', '')} | "
                     f"{r.get('ok', '')} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
