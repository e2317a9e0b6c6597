"""The GPU trust matrix: every (backend, head dim, GQA, gradients, variant) cell against float64, on one GPU.

    python3 benchmarks/gpu_matrix.py --workers 10 --out benchmarks/results/gpu_matrix.json [--cells REGEX]
    python3 benchmarks/gpu_matrix.py --cells 'REGEX' --merge --out SAME.json   # rerun some cells into a result

Cells: backends fa4 and flex; head dims 8, 16, 32, 48, 64, 80, 96, 128, 192, 256; without GQA (Hq = Hkv = 4) and
with it (Hq 4, Hkv 2); forward alone and forward + backward (gradients to q, k, v); variants
- causal: mask ``q_idx >= kv_idx`` (FA4's own causal flag), S = 256;
- score_tensor: score ``score + bias[h, kv_idx]`` (a score_mod reading a [Hq, Skv] float tensor), no mask, S = 256;
- document: mask ``doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx`` with documents of 70, 50, 100, 100 tokens (a
  mask_mod with tile lists whose tiles are partial), S = 320;
- decode: mask ``kv_idx <= q_idx + kv_len - q_len``, q_len 17 < kv_len 300;
- odd: mask ``(q_idx - kv_idx) % 5 != 2`` (a mask_mod of Python-sign modulo), q_len 131, kv_len 197.
A cell calls the backend by name when its ``unsupported()`` accepts the call ("pass" or "fail"); when it declines,
``backend="auto"`` runs the call and must pass ("declined", ``declined_to`` = what auto ran, ``reason``).

Reference: each variant written out again here in plain torch (not attnlang's eager backend), in float64 on the
GPU from the same bf16 inputs; gradients by autograd in float64 for the same upstream gradient.

Error measure and tolerances. For each compared tensor X (out, lse; dq, dk, dv with gradients) the cell records
max|X - X_ref| / max|X_ref| (``errors``) and ``max_rel_err`` = the largest of them. The inputs are exactly
representable in both precisions, so the error is the kernel's own: bf16 has unit roundoff u = 2^-8. A forward
kernel rounds P to bf16 before P·V and rounds out once (fp32 accumulation): about 2u of out's scale, so out and lse
must be within 8u = 0.03125. Each gradient element is a sum whose terms carry two bf16-rounded factors (dS =
P∘(dP - D) and P are rounded before dS·K, dS^T·Q, P^T·dO), accumulated in fp32 in a kernel-specific order, and the
sums cancel (their magnitude is below the sum of their terms' magnitudes): gradients must be within 32u = 0.125.
A wrong kernel is far outside: FA4's head-dim bug measured 0.4-0.8. The tolerances are fixed here, chosen before
any GPU run of this script, and never widened to make a cell pass.

Evidence cells (``evidence`` in the JSON; not part of the pass criterion): the fa4 backend with
``kernel_options={"guards": False}`` (FA4's kernel as is, no padding or expansion) at the cells a guard of
``attnlang.backends.fa4.GUARDS`` covers, so the guard table's rows can be checked against the kernel itself.

Runs the cells in ``--workers`` spawned processes (kernel compilation is CPU-bound) pulling from one queue; a cell
that runs past ``--timeout`` seconds kills its worker (the cell fails with "timeout", a new worker takes over), and
after ``--budget`` seconds the cells not yet run are recorded as failed ("not run: budget"). The JSON is rewritten
after every cell, so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 128, 192, 256)
BACKENDS = ("fa4", "flex")
U = 2.0 ** -8                       # bf16 unit roundoff
TOL = {"out": 8 * U, "lse": 8 * U, "dq": 32 * U, "dk": 32 * U, "dv": 32 * U}
B, HQ = 2, 4

VARIANTS = {
    # name: (score, mask, q_len, kv_len)
    "causal": ("score", "q_idx >= kv_idx", 256, 256),
    "score_tensor": ("score + bias[h, kv_idx]", "True", 256, 256),
    "document": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", 320, 320),
    "decode": ("score", "kv_idx <= q_idx + kv_len - q_len", 17, 300),
    "odd": ("score", "(q_idx - kv_idx) % 5 != 2", 131, 197),
}
DOC_LENGTHS = (70, 50, 100, 100)


def cell_id(c: dict) -> str:
    gqa = "gqa" if c["gqa"] else "mha"
    grad = "grad" if c["grad"] else "fwd"
    extra = "/unguarded" if c.get("unguarded") else ""
    return f"{c['backend']}/d{c['head_dim']}/{gqa}/{grad}/{c['variant']}{extra}"


def all_cells() -> list[dict]:
    cells = [dict(backend=b, head_dim=d, gqa=g, grad=gr, variant=v)
             for gr in (True, False) for d in sorted(HEAD_DIMS, reverse=True) for b in BACKENDS
             for g in (False, True) for v in VARIANTS]
    evidence = []
    for d in HEAD_DIMS:
        for g in (False, True):
            for v in ("causal", "score_tensor", "document"):
                modifier = v != "causal"
                if d % 32 or (g and modifier):  # where a row of fa4.GUARDS applies
                    evidence.append(dict(backend="fa4", head_dim=d, gqa=g, grad=True, variant=v, unguarded=True))
    return cells + evidence


# ---------------------------------------------------------------------------------------------------------------
# one cell (in a worker process)

def _import_attnlang():
    try:
        import attnlang.backends  # noqa: F401
    except ImportError:  # a checkout that is not installed: backends/ and grammar/ live at the top level
        sys.path.insert(0, str(ROOT))
        import attnlang
        attnlang.__path__.append(str(ROOT))
    import attnlang
    return attnlang


def _inputs(cell, torch, device="cuda"):
    score, mask, Sq, Skv = VARIANTS[cell["variant"]]
    D = cell["head_dim"]
    Hkv = 2 if cell["gqa"] else HQ
    seed = int(hashlib.sha1(cell_id(cell).encode()).hexdigest()[:8], 16)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, HQ, Sq, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, Skv, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, Skv, D, device=device, dtype=torch.bfloat16, generator=g)
    dout = torch.randn(B, HQ, Sq, D, device=device, dtype=torch.bfloat16, generator=g)
    tensors = {}
    if "bias" in score:
        tensors["bias"] = torch.randn(HQ, Skv, device=device, generator=g)
    if "doc" in mask:
        tensors["doc"] = torch.repeat_interleave(torch.arange(len(DOC_LENGTHS), device=device),
                                                 torch.tensor(DOC_LENGTHS, device=device))
    return q, k, v, dout, tensors


def reference(variant: str, q, k, v, tensors, torch):
    """(out, lse) in float64, the variant written out in plain torch (GQA: kv head h // (Hq / Hkv))."""
    qd, kd, vd = q.double(), k.double(), v.double()
    group = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(qd.shape[-1])
    Sq, Skv = s.shape[-2:]
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Skv, device=q.device)[None, :]
    allowed = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device)
    if variant == "causal":
        allowed = j <= i
    elif variant == "score_tensor":
        s = s + tensors["bias"].double()[None, :, None, :]
    elif variant == "document":
        doc = tensors["doc"]
        allowed = (doc[:, None] == doc[None, :]) & (j <= i)
    elif variant == "decode":
        allowed = j <= i + (Skv - Sq)
    elif variant == "odd":
        allowed = torch.remainder(i - j, 5) != 2  # Python's sign, as LANGUAGE.md's %
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vd
    return out, lse


def _rel(a, b) -> float:
    ref = float(b.abs().max())
    return float((a.double() - b).abs().max()) / max(ref, 1e-30)


def _call(al, backends, cell, q, k, v, dout, tensors, torch):
    """(errors, ran, reason): run the cell's call (by name, or through auto when declined) and compare."""
    score, mask, Sq, Skv = VARIANTS[cell["variant"]]
    variant = al.compile(score=score, mask=mask)
    options = {"guards": False} if cell.get("unguarded") else None
    grad = cell["grad"]
    name = cell["backend"]
    module = __import__(f"attnlang.backends.{name}", fromlist=["unsupported"])
    with torch.set_grad_enabled(grad):
        qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
        plan = variant._plan(qq, kk, vv, None, name, True, options, tensors)
        why_not = module.unsupported(qq, plan)
        if why_not is None:
            ran, reason = name, None
            out, lse = variant(qq, kk, vv, backend=name, return_lse=True, kernel_options=options, **tensors)
        else:
            auto_plan = variant._plan(qq, kk, vv, None, "auto", True, None, tensors)
            ran, reason = backends.select(qq, auto_plan, kk, vv)[0], why_not
            out, lse = variant(qq, kk, vv, return_lse=True, **tensors)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout) if grad else None
    qr, kr, vr = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        ref, ref_lse = reference(cell["variant"], qr, kr, vr, tensors, torch)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double()) if grad else None
    errors = {"out": _rel(out, ref), "lse": _rel(lse, ref_lse)}
    if grad:
        for key, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[key] = _rel(a, b)
    bad = [key for key, e in errors.items() if not e <= TOL[key]]  # NaN fails too
    return errors, bad, ran, reason


def run_cell(cell: dict, device: str = "cuda") -> dict:
    import torch
    al = _import_attnlang()
    from attnlang import backends
    q, k, v, dout, tensors = _inputs(cell, torch, device)
    t0 = time.time()
    result = dict(cell)
    try:
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            errors, bad, ran, reason = _call(al, backends, cell, q, k, v, dout, tensors, torch)
        declined = reason is not None
        outcome = "fail" if bad else ("declined" if declined else "pass")
        finite = all(map(math.isfinite, errors.values()))
        # JSON has no NaN / inf: a non-finite error is written as its name (and max_rel_err as None)
        errors = {key: e if math.isfinite(e) else str(e) for key, e in errors.items()}
        result.update(outcome=outcome, max_rel_err=max(errors.values()) if finite else None, errors=errors,
                      declined_to=ran if declined else None, reason=reason,
                      failed=bad or None,
                      warnings=sorted({str(w.message)[:300] for w in caught if "attnlang" in str(w.message)}) or None)
    except Exception as e:
        result.update(outcome="fail", max_rel_err=None, declined_to=None,
                      error=f"{type(e).__name__}: {str(e).strip()[:600]}",
                      traceback=traceback.format_exc()[-2000:])
    result["seconds"] = round(time.time() - t0, 2)
    return result


def worker(tasks, results, device="cuda"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch  # noqa: F401 - before the first cell: its import is not the cell's time
    _import_attnlang()
    while True:
        try:
            index, cell = tasks.get(timeout=1)
        except queue.Empty:
            continue
        if index is None:
            return
        results.put(("start", os.getpid(), index, time.time()))
        results.put(("done", os.getpid(), index, run_cell(cell, device)))


# ---------------------------------------------------------------------------------------------------------------
# the driver

def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "flash-attn-4", "nvidia-cutlass-dsl", "attnlang"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch
        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or os.environ.get("ATTNLANG_COMMIT", "unknown")
    except Exception:
        return os.environ.get("ATTNLANG_COMMIT", "unknown")


def _source_hash() -> str:
    """sha1 of attnlang's Python sources (attnlang/, backends/): ties the results to the code when git is absent."""
    h = hashlib.sha1()
    for folder in ("attnlang", "backends"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


_PRIOR: list = []  # --merge: an earlier run's results for cells this run does not repeat


def _write(path: Path, header: dict, cells: list, results: dict, started: float) -> None:
    order = {cell_id(c): n for n, c in enumerate(all_cells())}
    merged = _PRIOR + [results[i] for i in sorted(results)]
    merged.sort(key=lambda r: order.get(cell_id(r), len(order)))
    done = [r for r in merged if not r.get("unguarded")]
    evidence = [r for r in merged if r.get("unguarded")]
    counts = {o: sum(r["outcome"] == o for r in done) for o in ("pass", "declined", "fail")}
    doc = dict(header, seconds=round(time.time() - started, 1), counts=counts, tolerances=TOL, cells=done,
               evidence=evidence)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_matrix.json"))
    ap.add_argument("--cells", default=None, help="regex on cell ids such as fa4/d48/gqa/grad/causal")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds one cell may run")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole matrix")
    ap.add_argument("--no-evidence", action="store_true", help="leave out the unguarded fa4 cells")
    ap.add_argument("--list", action="store_true", help="print the cell ids and exit")
    ap.add_argument("--merge", action="store_true",
                    help="keep the cells of an existing --out file that this run does not repeat (a rerun of some)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the driver itself (cells then decline)")
    args = ap.parse_args(argv)
    cells = all_cells()
    if args.no_evidence:
        cells = [c for c in cells if not c.get("unguarded")]
    if args.cells:
        pattern = re.compile(args.cells)
        cells = [c for c in cells if pattern.search(cell_id(c))]
    if args.list:
        print("\n".join(map(cell_id, cells)))
        return 0
    started = time.time()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # one compile thread per worker: no pools of 16
    import torch
    header = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "versions": _versions(), "commit": _commit(), "source_sha1": _source_hash(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "workers": args.workers}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        ids = {cell_id(c) for c in cells}
        old = json.loads(out.read_text())
        _PRIOR.extend(r for r in old.get("cells", []) + old.get("evidence", []) if cell_id(r) not in ids)
        header["merged_from"] = old.get("started")
    ctx = mp.get_context("spawn")
    tasks, results_q = ctx.Queue(), ctx.Queue()
    for i, c in enumerate(cells):
        tasks.put((i, c))
    procs = {}

    def spawn():
        p = ctx.Process(target=worker, args=(tasks, results_q, args.device), daemon=True)
        p.start()
        procs[p.pid] = p

    for _ in range(min(args.workers, len(cells))):
        spawn()
    running: dict = {}   # pid -> (index, start time)
    results: dict = {}
    while len(results) < len(cells):
        now = time.time()
        if now - started > args.budget:
            break
        try:
            kind, pid, index, payload = results_q.get(timeout=1.0)
            if kind == "start":
                running[pid] = (index, payload)
            else:
                running.pop(pid, None)
                results[index] = payload
                print(f"[{now - started:6.1f}s] {cell_id(cells[index]):40s} {payload['outcome']:8s} "
                      f"{payload.get('max_rel_err')!s:.10s} {payload.get('error', '')[:100]}", flush=True)
                _write(out, header, cells, results, started)
        except queue.Empty:
            pass
        for pid, (index, t0) in list(running.items()):
            if time.time() - t0 > args.timeout and index not in results:
                procs[pid].kill()
                running.pop(pid)
                results[index] = dict(cells[index], outcome="fail", max_rel_err=None, declined_to=None,
                                      error=f"timeout: more than {args.timeout:g} s")
                print(f"{cell_id(cells[index])}: timeout, worker {pid} killed", flush=True)
                _write(out, header, cells, results, started)
                spawn()
        for pid, p in list(procs.items()):
            if not p.is_alive() and pid in running:  # a worker that died inside a cell (a crash)
                index, _ = running.pop(pid)
                results[index] = dict(cells[index], outcome="fail", max_rel_err=None, declined_to=None,
                                      error=f"worker died (exit code {p.exitcode})")
                _write(out, header, cells, results, started)
                spawn()
    for i, c in enumerate(cells):
        if i not in results:
            results[i] = dict(c, outcome="fail", max_rel_err=None, declined_to=None, error="not run: budget")
    for p in procs.values():
        if p.is_alive():
            p.kill()
    _write(out, header, cells, results, started)
    done = [r for i, r in results.items() if not cells[i].get("unguarded")]
    done += [r for r in _PRIOR if not r.get("unguarded")]
    fails = [cell_id(r) for r in done if r["outcome"] == "fail"]
    merged = " (with the merged ones)" if _PRIOR else ""
    print(f"{len(done)} cells{merged}: {sum(r['outcome'] == 'pass' for r in done)} pass, "
          f"{sum(r['outcome'] == 'declined' for r in done)} declined, {len(fails)} fail "
          f"({time.time() - started:.0f} s); written to {out}")
    for f in fails:
        print("FAIL", f)
    ev = [r for i, r in results.items() if cells[i].get("unguarded")]
    if ev:
        print("evidence (fa4 without guards): " + ", ".join(f"{cell_id(r)}={r['outcome']}" for r in ev))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
