"""Host time of one attention call on the GPU host, from FA4 itself to attnlang's op inside a compiled graph
(issue 18: the compiled prefill is host-bound, ~580 us of host per attention call against ~190 us for FA4's own
call; benchmarks/results/s7/prefill_profile.txt).

    python benchmarks/op_host_gpu.py --out DIR    # writes DIR/op_host_gpu.md and DIR/op_host_gpu_profile.txt

Shape of bench_compile's model attention: B=4, Hq=8, Hkv=2, S=2048, D=128, bf16, causal, q / k / v [B, H, S, D]
views of [B, S, H, D] buffers (what the model passes). Rows, inference (no_grad) and training (forward + backward
with grads to q / k / v), host us per call (n calls issued back to back after a sync) and GPU us per call:
- fa4_func: flash_attn_func(causal=True) on the [B, S, H, D] buffers;
- attnlang_fa4: variant(q, k, v, backend="fa4");
- op_eager: torch.ops.attnlang.attention called directly;
- compiled_attnlang / compiled_sdpa: torch.compile(fullgraph=True) of ``f(x) = attention(x * 1, k, v)`` (a fresh
  q buffer each call, as in a model).
Then cProfile of n compiled_attnlang calls (inference, then training) and of 5 compiled prefills of the model:
the top functions by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from host_diag import _profile as host_diag_profile  # noqa: E402 (cProfile of warm calls)
from host_diag import _timed  # noqa: E402 (host and CUDA-event time per call, as host_diag measures it)


def _profile(title: str, fn, n: int) -> str:
    return f"===== {title}: {n} calls\n" + host_diag_profile(fn, n, top=(40, 40))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args(argv)
    from flash_attn.cute import flash_attn_func

    import attnlang as al

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    B, Hq, Hkv, S, D = 4, 8, 2, 2048, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    qb, kb, vb = (torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
                  for h in (Hq, Hkv, Hkv))
    q, k, v = (t.transpose(1, 2) for t in (qb, kb, vb))
    causal = al.compile(mask="q_idx >= kv_idx")
    from attnlang import op
    key = op.call_key(causal._op_config, "fa4", None, False, None, ())

    def fa4_func(x, k, v):
        out = flash_attn_func(x.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    def attnlang_fa4(x, k, v):
        return causal(x, k, v, backend="fa4")

    def op_eager(x, k, v):
        return torch.ops.attnlang.attention(x, k, v, [], key, op.grad_bits(x, k, v, []))[0]

    def through(fn):
        return lambda x, k, v: fn((x * 1.0).to(x.dtype), k, v)

    def sdpa(x, k, v):
        return torch.nn.functional.scaled_dot_product_attention(x, k, v, is_causal=True, enable_gqa=True)

    rows = {"fa4_func": fa4_func, "attnlang_fa4": attnlang_fa4, "op_eager": op_eager,
            "compiled_attnlang": torch.compile(through(attnlang_fa4), fullgraph=True),
            "compiled_sdpa": torch.compile(through(sdpa), fullgraph=True)}
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    lines = [f"# Host time of one attention call ({torch.cuda.get_device_name()}, torch {torch.__version__}), "
             f"B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} bf16 causal, n={args.n}", "",
             "| row | inference host us | inference GPU us | train host us | train GPU us |", "|---|---|---|---|---|"]
    for name, fn in rows.items():
        def infer(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def train(fn=fn):
            fn(qg, kg, vg).backward(dout)
        cells = []
        for step in (infer, train):
            try:
                cells += [str(c) for c in _timed(step, args.n)]
            except Exception as e:  # recorded, not hidden
                cells += [f"{type(e).__name__}: {str(e)[:120]}", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "op_host_gpu.md").write_text("\n".join(lines) + "\n")
    prof = []

    def compiled_infer():
        with torch.no_grad():
            rows["compiled_attnlang"](q, k, v)
    prof.append(_profile("compiled_attnlang inference", compiled_infer, args.n))
    prof.append(_profile("compiled_attnlang train", lambda: rows["compiled_attnlang"](qg, kg, vg).backward(dout),
                         args.n))
    (args.out / "op_host_gpu_profile.txt").write_text("".join(prof))
    import bench_compile as bc

    import attnlang.integrations.transformers as alt
    alt.register()
    model = bc._model("attnlang", layers=4, hidden=1024, heads=8, kv_heads=2, head_dim=128, vocab=32000).eval()
    ids = torch.randint(0, 32000, (4, 2048), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(ids)
        prof.append(_profile("compiled model prefill", lambda: compiled(ids), 5))
    (args.out / "op_host_gpu_profile.txt").write_text("".join(prof))


if __name__ == "__main__":
    main()
