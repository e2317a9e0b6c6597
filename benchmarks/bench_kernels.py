"""The kernel benchmark of shared/BENCHMARKS.md: every contender on every variant, in one process, same tensors.

Contenders: sdpa (full, causal), flex_triton and flex_flash (torch.compile(flex_attention) with kernel_options
BACKEND TRITON / FLASH and a BlockMask from create_block_mask), fa4_builtin (flash_attn.cute.flash_attn_func with
its own causal / window_size / softcap / learnable_sink arguments, where they exist), attnlang_fa4
(Variant(..., backend="fa4")). sinks_window (gpt-oss: window 128 causal and a learned sink per head): flex has no
sink, so its contenders apply the correction FlexAttention users write by hand, out * exp(lse - logaddexp(lse,
sink)), compiled with the call (flex_flash's lse carries no gradient: its forward+backward time is a lower bound).
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
# attnlang comes from its install (`pip install -e .` here, a regular install on the GPU host): the checkout's own
# attnlang/ has no backends/ (package-dir maps it), so ROOT must not go in front of the installed package

VARIANTS = {
    # name: (score, mask, tensors needed)
    "full": ("score", "True"),
    "causal": ("score", "q_idx >= kv_idx"),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < 1024"),
    "document": ("score", "doc[q_idx] == doc[kv_idx]"),
    "prefix_lm": ("score", "kv_idx < 1024 | q_idx >= kv_idx"),
    "alibi_causal": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx"),
    "softcap_causal": ("30 * tanh(score / 30)", "q_idx >= kv_idx"),
    "document_random": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"),
    "sinks_window": ("score", "0 <= q_idx - kv_idx < 128"),
}
SINKS = {"sinks_window": "sinks[h]"}  # variant -> its sink expression (LANGUAGE.md)
CONTENDERS = ("sdpa", "flex_triton", "flex_flash", "fa4_builtin", "fa4_varlen", "attnlang_fa4", "attnlang_auto")


def document_lengths(S: int, seed: int = 0, lo: int = 64, hi: int = 3000) -> list:
    """Seeded random document lengths in [lo, hi] filling S positions (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < S:
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    out[-1] -= sum(out) - S
    return [n for n in out if n > 0]


def document_ids(S: int, device, seed: int = 0) -> torch.Tensor:
    lengths = document_lengths(S, seed)
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)


def variant_of(name: str):
    """The attnlang Variant of a benchmark row."""
    import attnlang as al
    score, mask = VARIANTS[name]
    return al.compile(score=score, mask=mask, sink=SINKS.get(name))


def named_tensors(name: str, S: int, H: int, device) -> dict:
    if name == "document":
        return {"doc": torch.arange(S, device=device) // (S // 8)}  # 8 equal documents
    if name == "document_random":
        return {"doc": document_ids(S, device)}
    if name == "alibi_causal":
        return {"slope": torch.exp2(-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)}
    if name == "sinks_window":
        return {"sinks": torch.linspace(-1.0, 2.0, H, device=device, dtype=torch.float32)}  # float32 [H] logits
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
        "document_random": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
        "prefix_lm": lambda b, h, q, kv: (kv < 1024) | (q >= kv),
        "alibi_causal": causal,
        "softcap_causal": causal,
        "sinks_window": lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 128),
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
        opts = {"BACKEND": backend}
        if name in SINKS:
            return _flex_with_sink(score_mod, block_mask, opts, tensors["sinks"], backend)
        compiled = torch.compile(flex_attention)
        return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)
    return make


def _flex_with_sink(score_mod, block_mask, opts, sinks, backend):
    """flex_attention and the sink's correction through lse, compiled together: out * exp(lse - lse'),
    lse' = logaddexp(lse, sink). torch 2.11 returns the FLASH kernel's lse times ln 2 (undone here), and FLASH's
    backward takes no lse gradient (detached: the backward then misses the sink's share, a lower bound in time)."""
    import math

    from torch.nn.attention.flex_attention import flex_attention

    from attnlang.backends.flex import _flash_lse_scaled_by_ln2
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # pragma: no cover - older torch
        AuxRequest = None
    rescale = backend == "FLASH" and _flash_lse_scaled_by_ln2()
    sink = sinks.float().view(1, -1, 1)

    def run(q, k, v):
        kw = dict(score_mod=score_mod, block_mask=block_mask, kernel_options=opts)
        if AuxRequest is not None:
            out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kw)
            lse = aux.lse
        else:
            out, lse = flex_attention(q, k, v, return_lse=True, **kw)
        if rescale:
            lse = lse / math.log(2.0)
        if backend == "FLASH":
            lse = lse.detach()
        factor = torch.exp(lse - torch.logaddexp(lse, sink))
        return (out * factor.unsqueeze(-1)).to(out.dtype)
    return torch.compile(run)


def make_fa4_builtin(name, tensors, S, H):
    from flash_attn.cute import flash_attn_func
    flags = {"full": {}, "causal": {"causal": True}, "sliding_window": {"window_size": (1023, 0)},
             "softcap_causal": {"causal": True, "softcap": 30.0},
             "sinks_window": {"window_size": (127, 0), "learnable_sink": tensors.get("sinks")}}.get(name)
    if flags is None:
        return None

    def run(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **flags)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def make_fa4_varlen(name, tensors, S, H):
    """flash_attn_varlen_func on packed [B * S, H, D] copies of q / k / v made once per input (a varlen user's
    tensors are packed already), cu_seqlens from the document ids; documents rows only, causal=True where the
    row's mask is causal inside documents (document_random), False for whole documents (document)."""
    doc = tensors.get("doc")
    if doc is None or not name.startswith("document"):
        return None
    from flash_attn.cute import flash_attn_varlen_func
    causal = "q_idx >= kv_idx" in VARIANTS.get(name, ("", "q_idx >= kv_idx"))[1]
    ids = doc.tolist()
    starts = [i for i in range(S) if i == 0 or ids[i] != ids[i - 1]]
    packed: dict = {}

    def run(q, k, v):
        B_, H_, S_, D = q.shape
        key = (id(q), id(k), id(v), q.requires_grad)
        if key not in packed:
            packed.clear()
            flat = tuple(t.detach().transpose(1, 2).reshape(B_ * S_, t.shape[1], t.shape[3]).clone()
                         .requires_grad_(t.requires_grad) for t in (q, k, v))
            cu = torch.tensor([b * S_ + s for b in range(B_) for s in starts] + [B_ * S_], dtype=torch.int32,
                              device=q.device)
            longest = int((cu[1:] - cu[:-1]).max())
            packed[key] = ((q, k, v), flat, cu, longest)
        _, flat, cu, longest = packed[key]
        for t in flat:
            t.grad = None
        out = flash_attn_varlen_func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                     max_seqlen_k=longest, causal=causal)
        out = out[0] if isinstance(out, tuple) else out
        return out.view(B_, S_, H_, out.shape[-1]).transpose(1, 2)
    return run


EXPERIMENTS = {  # contender -> the fa4 kernel_options it runs attnlang with
    "attnlang_fa4_tiles": {"window_flags": False, "dense_tile_list": True},
    "attnlang_fa4_keep_mask": {"keep_mask_mod": True},
    "attnlang_fa4_bhsd_out": {"bhsd_out": True},
    "attnlang_fa4_lse_sink": {"native_sink": False},  # a sink through (out, lse) instead of learnable_sink
}


def make_attnlang(options=None, backend="fa4"):
    def make(name, tensors, S, H):
        variant = variant_of(name)
        return lambda q, k, v: variant(q, k, v, backend=backend, kernel_options=options, **tensors)
    return make


def make_fa4_direct(name, tensors, S, H):
    """The kernel attnlang_fa4 runs, called straight with arguments prepared once: attnlang's per-call cost is
    the difference to attnlang_fa4."""
    from attnlang.backends import fa4
    variant = variant_of(name)
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
          "fa4_builtin": make_fa4_builtin, "fa4_varlen": make_fa4_varlen, "attnlang_fa4": make_attnlang(),
          "attnlang_auto": make_attnlang(backend="auto"),
          # experiments (not in the default set): other lowerings of the same variant, and the bare kernel
          **{name: make_attnlang(options) for name, options in EXPERIMENTS.items()},
          "fa4_direct": make_fa4_direct}


def describe_lowering(name, tensors, q, options=None) -> str:
    """How attnlang's fa4 backend ran this variant: kernel flags or mask_mod, modifiers, aux / baked tensors."""
    from attnlang.backends import fa4
    plan = variant_of(name)._plan(q, q, q, None, "fa4", False, options, tensors)
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
    if name.startswith("document"):
        mask += "; " + describe_varlen(variant_of(name), q, q, tensors, options)
    if plan.sink is not None:
        mask += ("; sink as FA4's learnable_sink" if fa4.native_sink(plan) else
                 "; sink applied to (out, lse) by attnlang.denominator")
    return (f"{mask}; score_mod={'yes' if low.score_mod else 'no'}; aux={list(low.tensors)}; "
            f"baked={baked}; block_sparsity={'yes' if low.mask_mod else 'no'}")


def describe_varlen(variant, q, k, tensors, options=None) -> str:
    """The fa4 backend's varlen choice for a documents call, for inference and for training."""
    from attnlang.backends import fa4, fa4_varlen
    out = []
    for what, grad in (("inference", False), ("training", True)):
        qq, kk = (t.detach().requires_grad_(grad) for t in (q, k))
        plan = variant._plan(qq, kk, kk, None, "fa4", False, options, tensors)
        with torch.set_grad_enabled(grad):
            out.append(f"{what}: {fa4_varlen.describe(qq, kk, kk, plan, fa4.VARLEN_HOST)}")
    return "; ".join(out)


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
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_kernels import named_tensors, variant_of
B, H, S, D = {shape}
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
res = {{}}
for name in {list(names)!r}:
    var = variant_of(name)
    t = named_tensors(name, S, H, "cuda")
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.no_grad():
        var(q, k, v, backend="fa4", **t)
    torch.cuda.synchronize(); res[name] = time.perf_counter() - t0
print("RESULT" + json.dumps(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          cwd=str(Path(__file__).resolve().parent))  # not the checkout root: see ROOT above
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


# ----- the shape suite (--suite): shape groups x variants x contenders -> <out>/shapes.{json,md} -----

SUITE_GROUPS = {
    # name: B, Hq, Hkv, q_len, kv_len, D, whether forward+backward is measured
    "gqa": dict(B=2, Hq=32, Hkv=8, Sq=4096, Skv=4096, D=128, bwd=True),
    "hd64": dict(B=4, Hq=16, Hkv=16, Sq=4096, Skv=4096, D=64, bwd=True),
    "long": dict(B=1, Hq=32, Hkv=8, Sq=32768, Skv=32768, D=128, bwd=False),
    "decode_q1": dict(B=16, Hq=32, Hkv=8, Sq=1, Skv=16384, D=128, bwd=False),
    "decode_q16": dict(B=16, Hq=32, Hkv=8, Sq=16, Skv=16384, D=128, bwd=False),
}
SUITE_VARIANTS = ("causal", "sliding_window", "document_random", "alibi", "softcap", "rel_table")
SUITE_CONTENDERS = ("sdpa", "flex_triton", "flex_flash", "flex_default", "fa4_builtin", "fa4_varlen",
                    "attnlang_fa4", "attnlang_auto")
SUITE_EXPERIMENTS = {  # documents only: attnlang with the varlen path forced on / off in both directions
    "attnlang_fa4_varlen_on": {"varlen": True}, "attnlang_fa4_varlen_off": {"varlen": False}}
REL_SIZE = 256  # relative-position table: rel[h, clamp(d, 0, 255)], d = distance below the diagonal


def _decode(group: dict) -> bool:
    return group["Sq"] != group["Skv"]


def _window(group: dict) -> int:
    return 4096 if _decode(group) else 1024


def suite_variant(name: str, group: dict):
    """(score, mask) of a suite variant, LANGUAGE.md spelling; decode groups align on the bottom-right diagonal
    (d = q_idx + kv_len - q_len - kv_idx), training groups on the top-left one (d = q_idx - kv_idx)."""
    d = "q_idx + kv_len - q_len - kv_idx" if _decode(group) else "q_idx - kv_idx"
    causal = "kv_idx <= q_idx + kv_len - q_len" if _decode(group) else "q_idx >= kv_idx"
    table = {
        "causal": ("score", causal),
        "sliding_window": ("score", f"0 <= {d} < {_window(group)}"),
        "document_random": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"),
        "alibi": ("score + slope[h] * (kv_idx - q_idx)", causal),
        "softcap": ("30 * tanh(score / 30)", causal),
        "rel_table": (f"score + rel[h, clamp({d}, 0, {REL_SIZE - 1})]", causal),
    }
    return table[name]


def suite_tensors(name: str, group: dict, device) -> dict:
    H = group["Hq"]
    if name == "document_random":
        return {"doc": document_ids(group["Sq"], device)}
    if name == "alibi":
        return {"slope": torch.exp2(-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)}
    if name == "rel_table":
        g = torch.Generator(device=device).manual_seed(0)
        return {"rel": 0.5 * torch.randn(H, REL_SIZE, device=device, generator=g)}
    return {}


def _suite_flex_mods(name: str, group: dict, tensors: dict):
    doc, slope, rel = tensors.get("doc"), tensors.get("slope"), tensors.get("rel")
    off = group["Skv"] - group["Sq"]
    W = _window(group)

    def causal(b, h, q, kv):
        return kv <= q + off

    masks = {"causal": causal, "sliding_window": lambda b, h, q, kv: (q + off - kv >= 0) & (q + off - kv < W),
             "document_random": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
             "alibi": causal, "softcap": causal, "rel_table": causal}
    scores = {"alibi": lambda s, b, h, q, kv: s + slope[h] * (kv - q),
              "softcap": lambda s, b, h, q, kv: 30 * torch.tanh(s / 30),
              "rel_table": lambda s, b, h, q, kv: s + rel[h, torch.clamp(q + off - kv, 0, REL_SIZE - 1)]}
    return scores.get(name), masks[name]


def suite_maker(contender: str, name: str, group: dict, tensors: dict):
    """A callable (q, k, v) -> out [B, Hq, Sq, D] for this cell, or None where the contender has no entry."""
    gqa = group["Hq"] != group["Hkv"]
    decode = _decode(group)
    if contender == "sdpa":
        if name != "causal":
            return None
        import torch.nn.functional as F
        if not decode:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if group["Sq"] == 1:  # one query row at the end: every key is allowed
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(group["Sq"], group["Skv"])
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
    if contender in ("flex_triton", "flex_flash", "flex_default"):
        if contender == "flex_default" and not decode:
            return None
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        score_mod, mask_mod = _suite_flex_mods(name, group, tensors)
        block_mask = create_block_mask(mask_mod, None, None, group["Sq"], group["Skv"], device="cuda")
        # dynamic=False: the cells' shapes differ, and after a few, automatic dynamic shapes made every FLASH cell
        # fail ("captures a dynamic scalar (SymInt/SymFloat)", session 5's suite)
        compiled = torch.compile(flex_attention, dynamic=False)
        opts = None if contender == "flex_default" else {"BACKEND": contender.split("_")[1].upper()}
        return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                        kernel_options=opts)
    if contender == "fa4_builtin":
        W = _window(group)
        flags = {"causal": {"causal": True}, "sliding_window": {"window_size": (W - 1, 0)},
                 "softcap": {"causal": True, "softcap": 30.0}}.get(name)
        if flags is None:
            return None
        if decode:
            flags = dict(flags, num_splits=0, pack_gqa=gqa)  # num_splits < 1: FA4's split heuristic
        from flash_attn.cute import flash_attn_func

        def run(q, k, v):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **flags)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        return run
    if contender == "fa4_varlen":
        if decode:
            return None
        return make_fa4_varlen(name, tensors, group["Sq"], group["Hq"])
    if contender.startswith("attnlang"):
        if contender in SUITE_EXPERIMENTS and name != "document_random":
            return None
        import attnlang as al
        score, mask = suite_variant(name, group)
        variant = al.compile(score=score, mask=mask)
        backend = "auto" if contender == "attnlang_auto" else "fa4"
        options = SUITE_EXPERIMENTS.get(contender)
        return lambda q, k, v: variant(q, k, v, backend=backend, kernel_options=options, **tensors)
    raise ValueError(f"unknown suite contender {contender!r}")


def suite_inputs(group: dict, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv, Sq, Skv, D = (group[x] for x in ("B", "Hq", "Hkv", "Sq", "Skv", "D"))

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    return rnd(B, Hq, Sq, D), rnd(B, Hkv, Skv, D), rnd(B, Hkv, Skv, D), rnd(B, Hq, Sq, D)


def suite_worker(jobs):
    """Worker mode: the first forward call (and, on training groups, one backward) of each (group, variant,
    contender) job, so compiled kernels land in the on-disk caches; prints RESULT {"g/v/c": seconds}."""
    res = {}
    for gname, name, contender in jobs:
        group = SUITE_GROUPS[gname]
        try:
            q, k, v, dout = suite_inputs(group)
            fn = suite_maker(contender, name, group, suite_tensors(name, group, "cuda"))
            if fn is None:
                continue
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(q, k, v)
            torch.cuda.synchronize()
            res[f"{gname}/{name}/{contender}"] = time.perf_counter() - t0
            if group["bwd"]:
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                out = fn(qg, kg, vg)
                if out.requires_grad:
                    out.backward(dout)
                torch.cuda.synchronize()
        except Exception as e:
            print(f"worker: {gname}/{name}/{contender} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    print("RESULT" + json.dumps(res), flush=True)


def suite_warm(jobs, n: int, timeout: float) -> dict:
    """First calls of ``jobs`` in ``n`` fresh processes side by side (compilation is CPU-bound); {"g/v/c": s}."""
    # FA4 jobs first in every worker: they fill the kernel cache the attnlang contenders then hit
    order = sorted(jobs, key=lambda j: (not j[2].startswith(("fa4", "attnlang")), j))
    parts = [order[i::n] for i in range(n)]
    base = [sys.executable, str(Path(__file__).resolve()), "--suite-worker"]
    procs = [subprocess.Popen(base + [json.dumps(p)], stdout=subprocess.PIPE, text=True) for p in parts if p]
    out = {}
    deadline = time.time() + timeout
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
            print("suite: a warm-up worker ran out of time; its remaining cells compile in the main process",
                  flush=True)
        for line in stdout.splitlines():
            if line.startswith("RESULT"):
                out.update(json.loads(line[6:]))
    return out


def _fastest(row: dict, suffix: str):
    cells = {c: row[f"{c}_{suffix}"] for c in SUITE_CONTENDERS if f"{c}_{suffix}" in row
             and not c.startswith("attnlang")}
    return min(cells.items(), key=lambda kv: kv[1]) if cells else (None, None)


def suite_markdown(doc: dict) -> str:
    md = [f"# Kernel benchmark across shapes: {doc['device']}", "",
          f"versions: {json.dumps(doc['versions'])}", "",
          "ms, median of triton.testing.do_bench (CUDA events) per cell; one process, contenders one after another "
          "on the same tensors. `best` is the fastest non-attnlang contender; `fa4/best` is attnlang_fa4's time "
          "over it (target <= 1.02), `auto/fa4` attnlang_auto's over attnlang_fa4 (target <= 1.02).", ""]
    for gname, g in doc["groups"].items():
        shape = g["shape"]
        md += [f"## {gname}: B={shape['B']} Hq={shape['Hq']} Hkv={shape['Hkv']} q_len={shape['Sq']} "
               f"kv_len={shape['Skv']} D={shape['D']} bf16", ""]
        contenders = [c for c in (*SUITE_CONTENDERS, *SUITE_EXPERIMENTS)
                      if any(f"{c}_fwd_ms" in r for r in g["variants"].values())]
        for suffix, title in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
            if not any(f"{c}_{suffix}" in r for r in g["variants"].values() for c in contenders):
                continue
            md += [f"{title}, ms:", "", "| variant | " + " | ".join(contenders) + " | best | fa4/best | auto/fa4 |",
                   "|---" * (len(contenders) + 4) + "|"]
            for name, row in g["variants"].items():
                cells = [("" if row.get(f"{c}_{suffix}") is None else f"{row[f'{c}_{suffix}']:.3f}")
                         for c in contenders]
                best, t = _fastest(row, suffix)
                mine, auto = row.get(f"attnlang_fa4_{suffix}"), row.get(f"attnlang_auto_{suffix}")
                ratio = f"{mine / t:.2f}" if mine and t else ""
                auto_ratio = f"{auto / mine:.2f}" if mine and auto else ""
                md.append(f"| {name} | " + " | ".join(cells) + f" | {best or ''} | {ratio} | {auto_ratio} |")
            md.append("")
        notes = [(n, r[k]) for n, r in g["variants"].items() for k in r if k.endswith("_lowering")]
        errors = [(n, k[:-6], r[k]) for n, r in g["variants"].items() for k in r if k.endswith("_error")]
        if notes:
            md += ["How attnlang_fa4 ran each variant:", ""] + [f"- {n}: {x}" for n, x in notes] + [""]
        if errors:
            md += ["Errors:", ""] + [f"- {n} / {c}: {x}" for n, c, x in errors] + [""]
    return "\n".join(md) + "\n"


def suite_main(args):
    """Run the shape suite for args.groups x args.variants x args.contenders; merge into <out>/<name>.json."""
    t_start = time.time()
    groups = args.groups or list(SUITE_GROUPS)
    variants = args.variants if args.variants_given else list(SUITE_VARIANTS)
    contenders = args.contenders if args.contenders_given else list(SUITE_CONTENDERS) + list(SUITE_EXPERIMENTS)
    for g in groups:
        if g not in SUITE_GROUPS:
            raise SystemExit(f"unknown group {g!r}; expected some of {', '.join(SUITE_GROUPS)}")
    jobs = [(g, n, c) for g in groups for n in variants for c in contenders
            if not (n == "document_random" and _decode(SUITE_GROUPS[g]))]
    first = suite_warm(jobs, args.parallel_first, args.warm_timeout) if args.parallel_first else {}
    print(f"suite: warm-up done in {time.time() - t_start:.0f} s ({len(first)} first calls)", flush=True)
    out_dir = Path(args.out)
    path = out_dir / f"{args.name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"device": torch.cuda.get_device_name(), "versions": versions()})
    doc.setdefault("groups", {})
    ref: dict = {}

    def save():  # after every cell: a run cut by its time limit keeps what it measured
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        (out_dir / f"{args.name}.md").write_text(suite_markdown(doc))

    # --rounds N: the whole job list N times over, round after round (the contenders of a cell interleave, so a
    # drift of the GPU's clocks or of the host's speed spreads over all of them); a cell keeps its samples and
    # their median
    for rnd, (gname, name, contender) in ((r, j) for r in range(args.rounds) for j in jobs):
        if args.budget and time.time() - t_start > args.budget:
            print(f"suite: time budget of {args.budget} s spent; cells from round {rnd}, {gname}/{name}/{contender} "
                  "on not measured", flush=True)
            break
        group = SUITE_GROUPS[gname]
        entry = doc["groups"].setdefault(gname, {"shape": {k: group[k] for k in ("B", "Hq", "Hkv", "Sq", "Skv", "D")},
                                                 "variants": {}})
        row = entry["variants"].setdefault(name, {})
        if rnd == 0:
            for key in [k for k in row if k.startswith(contender + "_")]:
                del row[key]  # this run replaces the cell
        try:
            tensors = suite_tensors(name, group, "cuda")
            fn = suite_maker(contender, name, group, tensors)
            if fn is None:
                continue
            q, k, v, dout = suite_inputs(group)
            first_s, fwd, fwdbwd, out = bench(fn, q, k, v, dout, group["bwd"], args.reps)
        except Exception as e:
            row[f"{contender}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{gname}/{name}/{contender} failed: {row[f'{contender}_error']}", flush=True)
            torch.cuda.empty_cache()
            continue
        for suffix, ms in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            if ms is None:
                continue
            samples = row.setdefault(f"{contender}_{suffix}_samples", [])
            samples.append(round(ms, 4))
            row[f"{contender}_{suffix}_ms"] = round(_median(samples), 4)
        if rnd == 0:
            row[f"{contender}_first_s"] = round(first.get(f"{gname}/{name}/{contender}", first_s), 3)
        key = (gname, name)
        if not contender.startswith("attnlang") and key not in ref:
            ref[key] = out.float()
        elif contender.startswith("attnlang") and key in ref:
            row[f"{contender}_max_abs_diff"] = float((out.float() - ref[key]).abs().max())
        if contender == "attnlang_fa4" and name == "document_random":
            row["attnlang_fa4_lowering"] = describe_varlen(al_compile(*suite_variant(name, group)), q, k, tensors)
        print(f"{gname:10s} {name:16s} {contender:24s} fwd {fwd:8.3f} ms  fwd+bwd "
              f"{'' if fwdbwd is None else f'{fwdbwd:8.3f}'}", flush=True)
        del fn, out
        torch.cuda.empty_cache()
        save()
    save()
    print(suite_markdown(doc))
    print(f"suite: {time.time() - t_start:.0f} s in all", flush=True)


def suite_merge(paths, out_dir: Path, name: str):
    """Cell-by-cell union of suite result files (later ones win), written as <out_dir>/<name>.{json,md}."""
    doc: dict = {"groups": {}}
    for p in paths:
        part = json.loads(Path(p).read_text())
        doc.update({k: part[k] for k in ("device", "versions") if k in part})
        for gname, g in part.get("groups", {}).items():
            into = doc["groups"].setdefault(gname, {"shape": g["shape"], "variants": {}})
            for vname, row in g["variants"].items():
                into["variants"].setdefault(vname, {}).update(row)
    doc.setdefault("device", "unknown")
    doc.setdefault("versions", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(suite_markdown(doc))
    return doc


def al_compile(score, mask):
    import attnlang as al
    return al.compile(score=score, mask=mask)



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
    ap.add_argument("--suite", action="store_true",
                    help="the shape suite instead: shape groups (--groups) x suite variants x suite contenders, "
                         "written to <out>/shapes.{json,md} (merged cell by cell into an existing shapes.json); "
                         "--variants / --contenders pick subsets, --parallel-first N warms up in N processes")
    ap.add_argument("--groups", nargs="*", default=None, help=f"suite groups: {', '.join(SUITE_GROUPS)}")
    ap.add_argument("--budget", type=float, default=0,
                    help="suite: stop starting new cells after this many seconds (0: no limit)")
    ap.add_argument("--warm-timeout", type=float, default=300, help="suite: seconds the warm-up workers may take")
    ap.add_argument("--suite-worker", help=argparse.SUPPRESS)  # suite worker mode: a JSON list of jobs
    ap.add_argument("--suite-merge", nargs="+", metavar="JSON",
                    help="no GPU: merge suite results (several runs' shapes.json, later files win per cell) into "
                         "<out>/<name>.{json,md}")
    args = ap.parse_args(argv)
    if args.suite_merge:
        return suite_merge(args.suite_merge, Path(args.out), "shapes" if args.name == "latest" else args.name)
    if args.suite_worker or args.suite:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = 1000
        torch._dynamo.config.cache_size_limit = 1000
        import attnlang.backends.fa4 as fa4_backend
        fa4_backend._flash()
        if args.suite_worker:
            return suite_worker(json.loads(args.suite_worker))
        raw = sys.argv[1:] if argv is None else argv
        args.variants_given = "--variants" in raw
        args.contenders_given = "--contenders" in raw
        if args.name == "latest":
            args.name = "shapes"
        if "--reps" not in raw:
            args.reps = 40
        return suite_main(args)
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
