"""The kernel benchmark of shared/BENCHMARKS.md: every contender on every variant, in one process, same tensors.

Contenders: sdpa (full, causal), flex_triton and flex_flash (torch.compile(flex_attention) with kernel_options
BACKEND TRITON / FLASH and a BlockMask from create_block_mask), fa4_builtin (flash_attn.cute.flash_attn_func with
its own causal / window_size / softcap flags, where one exists), attnlang_fa4 (Variant(..., backend="fa4")).
Forward and forward+backward medians of triton.testing.do_bench; the first call's seconds (compile included);
optionally (--second-process) the first call of attnlang_fa4 in a fresh process, which must find the kernels that
this run compiled in the on-disk cache.

    python benchmarks/bench_kernels.py                # B=4 H=16 S=8192 D=128 bf16, writes benchmarks/results/
    python benchmarks/bench_kernels.py --quick        # B=1 H=4 S=1024: a smoke run
Writes <out>/latest.json (BENCHMARKS.md's format) and <out>/latest.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    # name: (score, mask, tensors needed)
    "full": ("score", "True"),
    "causal": ("score", "q_idx >= kv_idx"),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < 1024"),
    "document": ("score", "doc[q_idx] == doc[kv_idx]"),
    "prefix_lm": ("score", "kv_idx < 1024 | q_idx >= kv_idx"),
    "alibi_causal": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx"),
    "softcap_causal": ("30 * tanh(score / 30)", "q_idx >= kv_idx"),
}
CONTENDERS = ("sdpa", "flex_triton", "flex_flash", "fa4_builtin", "attnlang_fa4")


def named_tensors(name: str, S: int, H: int, device) -> dict:
    if name == "document":
        return {"doc": torch.arange(S, device=device) // (S // 8)}  # 8 equal documents
    if name == "alibi_causal":
        return {"slope": torch.exp2(-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)}
    return {}


# ----- contenders: each returns a callable (q, k, v) -> out in [B, H, S, D], or None where it has no entry -----

def make_sdpa(name, tensors, S, H):
    import torch.nn.functional as F
    if name == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return None


def _flex_mods(name, tensors):
    doc, slope = tensors.get("doc"), tensors.get("slope")

    def causal(b, h, q, kv):
        return q >= kv

    masks = {
        "full": None,
        "causal": causal,
        "sliding_window": lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 1024),
        "document": lambda b, h, q, kv: doc[q] == doc[kv],
        "prefix_lm": lambda b, h, q, kv: (kv < 1024) | (q >= kv),
        "alibi_causal": causal,
        "softcap_causal": causal,
    }
    scores = {
        "alibi_causal": lambda s, b, h, q, kv: s + slope[h] * (kv - q),
        "softcap_causal": lambda s, b, h, q, kv: 30 * torch.tanh(s / 30),
    }
    return scores.get(name), masks[name]


def make_flex(backend):
    def make(name, tensors, S, H):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        score_mod, mask_mod = _flex_mods(name, tensors)
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, None, None, S, S, device="cuda")
        compiled = torch.compile(flex_attention)
        opts = {"BACKEND": backend}
        return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)
    return make


def make_fa4_builtin(name, tensors, S, H):
    from flash_attn.cute import flash_attn_func
    flags = {"full": {}, "causal": {"causal": True}, "sliding_window": {"window_size": (1023, 0)},
             "softcap_causal": {"causal": True, "softcap": 30.0}}.get(name)
    if flags is None:
        return None

    def run(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **flags)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


EXPERIMENTS = {  # contender -> the fa4 kernel_options it runs attnlang with
    "attnlang_fa4_tiles": {"window_flags": False, "dense_tile_list": True},
    "attnlang_fa4_keep_mask": {"keep_mask_mod": True},
    "attnlang_fa4_bhsd_out": {"bhsd_out": True},
}


def make_attnlang(options=None):
    def make(name, tensors, S, H):
        import attnlang as al
        score, mask = VARIANTS[name]
        variant = al.compile(score=score, mask=mask)
        return lambda q, k, v: variant(q, k, v, backend="fa4", kernel_options=options, **tensors)
    return make


def make_fa4_direct(name, tensors, S, H):
    """The kernel attnlang_fa4 runs, called straight with arguments prepared once: attnlang's per-call cost is
    the difference to attnlang_fa4."""
    import attnlang as al
    from attnlang.backends import fa4
    score, mask = VARIANTS[name]
    variant = al.compile(score=score, mask=mask)
    prepared = {}

    def run(q, k, v):
        key = q.requires_grad
        if key not in prepared:
            plan = variant._plan(q, k, v, None, "fa4", False, None, tensors)
            prepared[key] = (plan, fa4.kernel_arguments(q, k, v, plan)[2])
        plan, kwargs = prepared[key]
        out, _ = fa4._flash().flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        return out.transpose(1, 2)
    return run


MAKERS = {"sdpa": make_sdpa, "flex_triton": make_flex("TRITON"), "flex_flash": make_flex("FLASH"),
          "fa4_builtin": make_fa4_builtin, "attnlang_fa4": make_attnlang(),
          # experiments (not in the default set): other lowerings of the same variant, and the bare kernel
          **{name: make_attnlang(options) for name, options in EXPERIMENTS.items()},
          "fa4_direct": make_fa4_direct}


def describe_lowering(name, tensors, q, options=None) -> str:
    """How attnlang's fa4 backend ran this variant: kernel flags or mask_mod, modifiers, aux / baked tensors."""
    import attnlang as al
    from attnlang.backends import fa4
    score, mask = VARIANTS[name]
    plan = al.compile(score=score, mask=mask)._plan(q, q, q, None, "fa4", False, options, tensors)
    low = fa4.lowering(plan)
    baked = [n for n, _, _ in fa4._tables(plan)]
    mask = low.native
    options = options or {}
    if low.mask_mod and _tile_aligned(plan) and not options.get("keep_mask_mod"):
        _, _, partial = fa4._block_sparse(plan, low, q.device)
        if not partial:
            mask = "block-sparse tile lists only (every tile full or empty: no mask_mod, no mask tensors)"
    elif not low.mask_mod and low.window == (None, None) and options.get("dense_tile_list"):
        mask = "no mask: an all-full tile list (FA4's block-sparse schedule)"
    if options.get("bhsd_out"):
        mask += "; out written into a [B, H, S, D] buffer (inference)"
    return (f"{mask}; score_mod={'yes' if low.score_mod else 'no'}; aux={list(low.tensors)}; "
            f"baked={baked}; block_sparsity={'yes' if low.mask_mod else 'no'}")


def _tile_aligned(plan) -> bool:
    from attnlang.backends import fa4
    return plan.q_len % fa4._TILE[0] == 0 and plan.kv_len % fa4._TILE[1] == 0


def bench(fn, q, k, v, dout, do_bwd: bool, reps: int):
    """(first_s, fwd_ms, fwdbwd_ms); first_s is the first forward call, compile included."""
    from triton.testing import do_bench
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(q, k, v)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v), warmup=25, rep=reps, return_mode="median")
    fwdbwd = None
    if do_bwd:
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        if not fn(qg, kg, vg).requires_grad:  # an inference-only contender
            return first, fwd, None, out

        def step():
            o = fn(qg, kg, vg)
            o.backward(dout)
        step()  # compile the backward outside the timing
        fwdbwd = do_bench(step, warmup=25, rep=reps, grad_to_none=[qg, kg, vg], return_mode="median")
    return first, fwd, fwdbwd, out


def first_worker(jobs, q, k, v, dout, S, H):
    """Worker mode: for each job, the first forward call (compile included) and one backward (compiled, so
    the main process finds it cached). Prints one RESULT line of {"variant/contender": seconds}."""
    res = {}
    for name, contender in jobs:
        try:
            fn = MAKERS[contender](name, named_tensors(name, S, H, "cuda"), S, H)
            if fn is None:
                continue
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(q, k, v)
            torch.cuda.synchronize()
            res[f"{name}/{contender}"] = time.perf_counter() - t0
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            fn(qg, kg, vg).backward(dout)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"worker: {name}/{contender} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    print("RESULT" + json.dumps(res), flush=True)


def parallel_first(jobs, args) -> dict:
    """Run the first calls of ``jobs`` in args.parallel_first fresh processes at once; {"v/c": seconds}."""
    n = args.parallel_first
    # spread each contender's jobs over the workers; a worker holds jobs of different contenders
    parts = [jobs[i::n] for i in range(n)]
    base = [sys.executable, str(Path(__file__).resolve())]
    if args.shape:
        base += ["--shape", *map(str, args.shape)]
    elif args.quick:
        base += ["--quick"]
    procs = [subprocess.Popen(base + ["--first-only", json.dumps(p)], stdout=subprocess.PIPE, text=True)
             for p in parts if p]
    out = {}
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        for line in stdout.splitlines():
            if line.startswith("RESULT"):
                out.update(json.loads(line[6:]))
    return out


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dist in (("triton", "triton"), ("flash_attn", "flash-attn-4"), ("cutlass", "nvidia-cutlass-dsl")):
        try:
            from importlib.metadata import version
            out[dist] = version(dist)
        except Exception:
            try:
                out[dist] = __import__(mod).__version__
            except Exception:
                out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def second_process(names, shape) -> dict:
    """First-call seconds of attnlang_fa4 per variant in a fresh process (kernels from the disk cache)."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_kernels import VARIANTS, named_tensors
import attnlang as al
B, H, S, D = {shape}
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
res = {{}}
for name in {list(names)!r}:
    score, mask = VARIANTS[name]
    var = al.compile(score=score, mask=mask)
    t = named_tensors(name, S, H, "cuda")
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.no_grad():
        var(q, k, v, backend="fa4", **t)
    torch.cuda.synchronize(); res[name] = time.perf_counter() - t0
print("RESULT" + json.dumps(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return {}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def table(results: dict, suffix: str, contenders=CONTENDERS) -> list[str]:
    lines = ["| variant | " + " | ".join(contenders) + " |", "|---" * (len(contenders) + 1) + "|"]
    for name, row in results.items():
        cells = []
        for c in contenders:
            x = row.get(f"{c}_{suffix}")
            cells.append("" if x is None else f"{x:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B=1 H=4 S=1024: a smoke run")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "H", "S", "D"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--reps", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every (variant, contender) this many times, round after round, and keep the "
                         "median (the samples and their spread go to the JSON)")
    ap.add_argument("--second-process", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="latest", help="file stem of the results (<out>/<name>.json and .md)")
    ap.add_argument("--parallel-first", type=int, default=0, metavar="N",
                    help="measure first calls (compile included) in N fresh worker processes running side by side, "
                         "which also fill the on-disk caches; the main process then times warm kernels and its "
                         "own first call of attnlang_fa4 is the second-process (cached) first call")
    ap.add_argument("--first-only", help=argparse.SUPPRESS)  # worker mode: a JSON list of [variant, contender]
    args = ap.parse_args(argv)
    import torch._dynamo
    from tqdm import tqdm
    torch._dynamo.config.recompile_limit = 1000
    torch._dynamo.config.cache_size_limit = 1000
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 10000
    import attnlang.backends.fa4 as fa4_backend
    fa4_backend._flash()  # the kernel disk cache is switched on before anything imports flash_attn.cute
    B, H, S, D = args.shape or ((1, 4, 1024, 128) if args.quick else (4, 16, 8192, 128))
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    results: dict = {}
    jobs = [(n, c) for n in args.variants for c in args.contenders]
    if args.first_only:
        return first_worker(json.loads(args.first_only), q, k, v, dout, S, H)
    first_calls = parallel_first(jobs, args) if args.parallel_first else {}
    ref_out: dict = {}
    samples: dict = {}
    failed: set = set()
    # each round runs a variant's contenders in another rotation, so that none is always the one measured last
    # (the H200 ran ~5% slower late in a burst of work: clocks fall as it heats)
    cs = list(args.contenders)
    rounds = [(r, n, c) for r in range(args.rounds) for n in args.variants
              for c in cs[r % len(cs):] + cs[:r % len(cs)]]
    for rnd, name, contender in tqdm(rounds, desc="bench", file=sys.stdout, mininterval=0):
        row = results.setdefault(name, {})
        tensors = named_tensors(name, S, H, "cuda")
        if (name, contender) in failed:
            continue
        try:
            fn = MAKERS[contender](name, tensors, S, H)
            if fn is None:
                continue
            first, fwd, fwdbwd, out = bench(fn, q, k, v, dout, not args.no_bwd, args.reps)
        except Exception as e:  # one contender failing must not lose the rest of the table
            row[f"{contender}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"\n{name} / {contender} failed: {row[f'{contender}_error']}", flush=True)
            failed.add((name, contender))
            continue
        got = samples.setdefault((name, contender), {"fwd": [], "fwdbwd": []})
        got["fwd"].append(fwd)
        if fwdbwd is not None:
            got["fwdbwd"].append(fwdbwd)
        print(f"\n[round {rnd + 1}] {name:15s} {contender:22s} fwd {fwd:7.3f} ms  fwd+bwd "
              f"{'' if fwdbwd is None else f'{fwdbwd:7.3f}'} ms", flush=True)
        if rnd > 0:
            fwd = _median(got["fwd"])
            fwdbwd = _median(got["fwdbwd"]) if got["fwdbwd"] else None
            row[f"{contender}_fwd_ms"] = round(fwd, 4)
            row[f"{contender}_fwd_ms_samples"] = [round(x, 4) for x in got["fwd"]]
            if fwdbwd is not None:
                row[f"{contender}_fwdbwd_ms"] = round(fwdbwd, 4)
                row[f"{contender}_fwdbwd_ms_samples"] = [round(x, 4) for x in got["fwdbwd"]]
            del fn
            torch.cuda.empty_cache()
            continue
        if first_calls:
            if contender == "attnlang_fa4":
                row["attnlang_fa4_first_s_second_process"] = round(first, 3)
            first = first_calls.get(f"{name}/{contender}")
        if first is not None:
            row[f"{contender}_first_s"] = round(first, 3)
        row[f"{contender}_fwd_ms"] = round(fwd, 4)
        if fwdbwd is not None:
            row[f"{contender}_fwdbwd_ms"] = round(fwdbwd, 4)
        if contender in ("flex_flash", "flex_triton", "sdpa") and name not in ref_out:
            ref_out[name] = out.float()
        if contender == "attnlang_fa4" and name in ref_out:
            row["attnlang_fa4_max_abs_diff_vs_flex"] = float((out.float() - ref_out[name]).abs().max())
        if contender.startswith("attnlang_fa4"):
            row[f"{contender}_lowering"] = describe_lowering(name, tensors, q, EXPERIMENTS.get(contender))
        print(f"\n{name:15s} {contender:13s} first {first or float('nan'):7.2f} s  fwd {fwd:7.3f} ms  fwd+bwd "
              f"{'' if fwdbwd is None else f'{fwdbwd:7.3f}'} ms", flush=True)
        del fn
        torch.cuda.empty_cache()
    if args.second_process and "attnlang_fa4" in args.contenders:
        for name, secs in second_process(args.variants, (B, H, S, D)).items():
            results[name]["attnlang_fa4_first_s_second_process"] = round(secs, 3)
    device = torch.cuda.get_device_name()
    doc = {"device": device, "versions": versions(), "shape": {"B": B, "H": H, "S": S, "D": D, "dtype": "bfloat16"},
           "variants": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"# Kernel benchmark: {device}, B={B} H={H} S={S} D={D} bf16", "",
          f"versions: {json.dumps(doc['versions'])}", "", "Forward, ms (median of triton.testing.do_bench):", ""]
    cs = args.contenders
    rounds_note = f" over {args.rounds} rounds, median of the rounds" if args.rounds > 1 else ""
    md[-2] = f"Forward, ms (median of triton.testing.do_bench{rounds_note}):"
    md += table(results, "fwd_ms", cs) + ["", "Forward+backward, ms:", ""] + table(results, "fwdbwd_ms", cs)
    md += ["", "First call, s (compile included" + (", each measured in a fresh worker process, "
           f"{args.parallel_first} workers side by side" if args.parallel_first else "") + "):", ""]
    md += table(results, "first_s", cs)
    second = {n: r.get("attnlang_fa4_first_s_second_process") for n, r in results.items()}
    if any(x is not None for x in second.values()):
        md += ["", "attnlang_fa4 first call in a second process (kernels from the disk cache), s:", ""]
        md += [f"- {n}: {x}" for n, x in second.items()]
    lows = {f"{n} / {key[:-9]}": x for n, r in results.items() for key, x in r.items() if key.endswith("_lowering")}
    if lows:
        md += ["", "How attnlang_fa4 ran each variant:", ""] + [f"- {n}: {x}" for n, x in lows.items()]
    errors = [(n, k, v) for n, r in results.items() for k, v in r.items() if k.endswith("_error")]
    if errors:
        md += ["", "Errors:", ""] + [f"- {n} / {k[:-6]}: {v}" for n, k, v in errors]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
