"""The `attnlang` command: check, explain and demo.

    attnlang check   --score EXPR --mask EXPR [--sink EXPR] [--no-normalize] [--param NAME=VALUE ...]
    attnlang explain --score EXPR --mask EXPR [--sink EXPR] [--no-normalize] [--param ...] [--q-len N --kv-len N]
                     [--png FILE] [--tensor NAME=FILE ...] [--block-size N|NxM]
    attnlang demo    [--seq-len 2048 --batch 1 --heads 8 --kv-heads 2 --head-dim 64 --backend auto]

Exit status: 0 on success, 2 on a bad expression or argument (the error is printed with a caret).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

from .ast import Index, walk
from .check import check_named_tensor
from .errors import AttnLangError

__all__ = ["main"]


def _param(text: str):
    if "=" not in text:
        raise AttnLangError(f"--param {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    name, value = name.strip(), value.strip()
    low = value.lower()
    if low in ("true", "false"):
        return name, low == "true"
    try:
        return name, int(value)
    except ValueError:
        if value.lstrip("+-").isdigit():  # past Python's 4300-digit int limit: float() would make it inf
            raise AttnLangError(f"--param {name}: an int of {len(value)} digits does not fit in 64 bits") from None
    try:
        return name, float(value)
    except ValueError:
        raise AttnLangError(f"--param {name}: {value!r} is not an int, float or bool") from None


def _positive_int(text: str) -> int:
    """argparse type: an int of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {n}")
    return n


def _block_size(text: str):
    """argparse type: ``N`` (square blocks) or ``NxM`` / ``N,M`` (query x key blocks) of positive ints."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected N or NxM, got {text!r}")
    sizes = tuple(_positive_int(p.strip()) for p in parts)
    return sizes[0] if len(sizes) == 1 else sizes


def _params(items) -> dict:
    out = {}
    for item in items or ():
        name, value = _param(item)
        if name in out:
            raise AttnLangError(f"--param {name} given twice")
        out[name] = value
    return out


def _tensors(items, device="cpu") -> dict:
    import torch
    out = {}
    for item in items or ():
        if "=" not in item:
            raise AttnLangError(f"--tensor {item!r}: expected NAME=FILE (a torch.save file or a .npy file)")
        name, path = item.split("=", 1)
        if name in out:
            raise AttnLangError(f"--tensor {name} given twice")
        try:
            if path.endswith(".npy"):
                import numpy as np
                out[name] = torch.from_numpy(np.load(path))
            else:
                out[name] = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # any unreadable file is the user's input error
            raise AttnLangError(f"--tensor {name}: cannot read {path!r}: {e}") from None
    return out


def _variant(args):
    from .variant import compile
    return compile(args.score, args.mask, _params(args.param), sink=args.sink, normalize=args.normalize)


def cmd_check(args) -> int:
    v = _variant(args)
    score, mask, shift = v.canonical[:3]
    # a term the simplifier moved out of the score (a per-row shift softmax ignores) is still part of the variant:
    # it is added back to lse, so it is shown, not dropped from the line
    shifted = f" | lse shift: {shift} (moved out of the score: softmax drops a per-row shift)" if shift else ""
    extra = "".join(f" | {part}" for part in v.canonical[3:])
    print(f"ok: score: {score} | mask: {mask}{shifted}{extra}")
    return 0


def cmd_explain(args) -> int:
    if args.png is not None and not args.png.strip():
        raise AttnLangError("--png needs a file name")
    v = _variant(args)
    q_len = args.q_len
    kv_len = args.kv_len if args.kv_len is not None else q_len
    if kv_len is not None and q_len is None:
        q_len = kv_len
    tensors = _tensors(args.tensor)  # loaded and checked with or without --png: a bad file is never ignored
    for name, t in tensors.items():
        check_named_tensor(name, t, v.checked.tensors)
    print(v.explain(q_len, kv_len, args.block_size, **tensors))  # by position: a tensor may be 'block_size'
    if args.png:
        from .picture import draw
        q_len = q_len or 1024
        kv_len = kv_len or q_len
        missing = sorted({n.tensor for n in walk(v.simplified.mask) if isinstance(n, Index)} - set(tensors))
        if missing:
            raise AttnLangError(f"the mask reads tensor {missing[0]!r}; to draw it pass --tensor {missing[0]}=FILE "
                                f"(a torch.save file or a .npy file)")
        draw(v, args.png, q_len=q_len, kv_len=kv_len, block_size=args.block_size, **tensors)
        print(f"wrote {args.png}")
    return 0


def _examples():
    from . import examples
    mods = []
    for info in sorted(pkgutil.iter_modules(examples.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"{examples.__name__}.{info.name}"))
    return mods


def allowed_fraction(variant, q_len: int, kv_len: int, batch: int, heads: int, **tensors) -> float:
    """Exact fraction of (b, h, q, kv) positions the simplified mask allows (evaluated in row chunks)."""
    import torch

    from .ast import names_used
    from .check import dtype_of_torch
    from .lower_torch import evaluate, positions
    bound = variant._bind({n: dtype_of_torch(t.dtype) for n, t in tensors.items()})[1].mask
    used = names_used(bound)
    B = batch if "b" in used else 1  # a mask that ignores b (or h) is counted once and scaled
    H = heads if "h" in used else 1
    allowed = 0
    rows = max(1, (1 << 22) // max(1, B * H * kv_len))
    for start in range(0, q_len, rows):
        r = min(rows, q_len - start)
        names = positions(B, H, start, r, kv_len)
        names.update(q_len=torch.tensor(q_len), kv_len=torch.tensor(kv_len))
        m = evaluate(bound, {n: t for n, t in names.items() if n in used}, tensors)
        allowed += int(m.expand(B, H, r, kv_len).sum()) * (batch // B) * (heads // H)
    return allowed / (batch * heads * q_len * kv_len)


def _backend_runs_here(backend: str, device: str, dtype, head_dim: int) -> None:
    """Ask ``backend`` once, up front, whether it can run here (device, dtype, head dim, its libraries) with the
    plainest variant, so that a backend that cannot run at all is one error, not one per example.

    Raises:
        AttnLangError: the backend's own reason, and what to run instead.
    """
    if backend in ("auto", "eager"):
        return
    import torch

    from .variant import compile
    q = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)
    plan = compile()._plan(q, q, q, None, backend, False, None, {})
    try:
        why = importlib.import_module(f"attnlang.backends.{backend}").unsupported(q, plan)
    except ImportError as e:  # a backend whose optional dependency is missing
        why = str(e)
    if why is not None:
        raise AttnLangError(f"--backend {backend} cannot run on this machine (device {device}, {str(dtype)[6:]}, "
                            f"head dim {head_dim}): {why}; use --backend auto or eager")


def cmd_demo(args) -> int:
    import torch

    from .backends import select
    from .variant import reference
    torch.manual_seed(0)
    device = args.device
    try:
        torch.empty(0, device=device)
    except Exception as e:  # an unknown device string, or CUDA asked for where there is none
        raise AttnLangError(f"--device {device!r} is not usable here: {e}") from None
    if args.heads % args.kv_heads:
        raise AttnLangError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    _backend_runs_here(args.backend, device, getattr(torch, args.dtype), args.head_dim)
    mods = _examples()
    names = [getattr(mod, "NAME", mod.__name__.rsplit(".", 1)[-1]) for mod in mods]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        raise AttnLangError(f"--only {unknown[0]}: no such example; the examples are {', '.join(names)}")
    rows = []
    header = f"{'variant':<24} {'backend':<8} {'q_len':>6} {'kv_len':>6} {'rel err':>9} {'time ms':>9} {'allowed':>8}"
    print(f"attnlang demo: B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, S={args.seq_len}, "
          f"D={args.head_dim}, {args.dtype}, device {device}, backend {args.backend}")
    print(header)
    print("-" * len(header))
    dtype = getattr(torch, args.dtype)
    failures = 0
    for mod, name in zip(mods, names):
        if args.only and name not in args.only:
            continue
        q_len, kv_len = args.seq_len, args.seq_len
        if hasattr(mod, "demo_lengths"):
            q_len, kv_len = mod.demo_lengths(args.seq_len)
        g = torch.Generator().manual_seed(0)
        try:
            q = torch.randn(args.batch, args.heads, q_len, args.head_dim, generator=g).to(device, dtype)
            k = torch.randn(args.batch, args.kv_heads, kv_len, args.head_dim, generator=g).to(device, dtype)
            v = torch.randn(args.batch, args.kv_heads, kv_len, args.head_dim, generator=g).to(device, dtype)
            tensors = mod.tensors(args.batch, args.heads, q_len, kv_len, device=device)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError too
            raise AttnLangError(f"cannot allocate the inputs of {name} (q [{args.batch}, {args.heads}, {q_len}, "
                                f"{args.head_dim}]) on {device}: {str(e).splitlines()[0]}; use a smaller "
                                f"--seq-len, --batch or --heads") from None
        variant = mod.VARIANT
        try:
            plan = variant._plan(q, k, v, None, args.backend, False, None, tensors)
            chosen = select(q, plan)[0] if args.backend == "auto" else args.backend
            out = variant(q, k, v, backend=args.backend, **tensors)  # warm-up (compiles where a backend does)
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = variant(q, k, v, backend=args.backend, **tensors)
            if device != "cpu":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            ref = reference(q.double(), k.double(), v.double(), variant,
                            **{n: (t.double() if t.is_floating_point() else t) for n, t in tensors.items()})
            # relative to the output's scale (at least 1): unnormalized variants (normalize=False) sum over many
            # keys, and a 16-bit output of magnitude 400 carries absolute rounding of ~0.1
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            err = float((out.double() - ref).abs().max()) / scale
            frac = allowed_fraction(variant, q_len, kv_len, args.batch, args.heads, **tensors)
        except AttnLangError as e:
            failures += 1
            print(f"{name:<24} error: {e}")
            continue
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        flag = "" if err <= tol else "  MISMATCH"
        failures += bool(flag)
        rows.append((name, chosen, err, ms, frac))
        print(f"{name:<24} {chosen:<8} {q_len:>6} {kv_len:>6} {err:>9.2e} {ms:>9.1f} {frac:>8.4f}{flag}")
    print(f"{len(rows)} variants ran, {failures} failed (max error against the float64 eager "
          f"reference, relative to its largest |value| when above 1)")
    return 1 if failures else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlang", description="Attention variants as two short expressions.")
    sub = p.add_subparsers(dest="command", required=True)

    def expr_args(sp):
        sp.add_argument("--score", default="score", help="score expression (default: score)")
        sp.add_argument("--mask", default="True", help="mask expression (default: True)")
        sp.add_argument("--param", action="append", metavar="NAME=VALUE", help="a compile-time scalar")
        sp.add_argument("--sink", default=None, metavar="EXPR",
                        help="sink expression: the logit of one extra key per row (default: none)")
        sp.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="out is the softmax's numerator alone (sigmoid attention)")

    c = sub.add_parser("check", help="check a variant; exit 2 with the error on bad input")
    expr_args(c)
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("explain", help="explain a variant (and draw its mask with --png)")
    expr_args(e)
    e.add_argument("--q-len", type=_positive_int, default=None)
    e.add_argument("--kv-len", type=_positive_int, default=None)
    e.add_argument("--png", default=None, metavar="FILE", help="draw the mask's (q, kv) picture")
    e.add_argument("--tensor", action="append", metavar="NAME=FILE",
                   help="a tensor the variant reads (.pt/.npy); always loaded and checked, and a mask's tensors give "
                        "its block sparsity")
    e.add_argument("--block-size", type=_block_size, default=(128, 128), metavar="N|NxM",
                   help="blocks of the sparsity report and the block picture (default 128x128)")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="run the examples gallery against the reference and print a table")
    d.add_argument("--seq-len", type=_positive_int, default=2048)
    d.add_argument("--batch", type=_positive_int, default=1)
    d.add_argument("--heads", type=_positive_int, default=8)
    d.add_argument("--kv-heads", type=_positive_int, default=2)
    d.add_argument("--head-dim", type=_positive_int, default=64)
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    d.add_argument("--device", default=None)
    d.add_argument("--backend", default="auto", choices=["auto", "eager", "flex", "fa4"])
    d.add_argument("--only", action="append", help="run only this variant (repeatable)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "device", None) is None and args.command == "demo":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "dtype", "x") is None:
        args.dtype = "bfloat16" if args.device != "cpu" else "float32"
    try:
        return args.func(args)
    except AttnLangError as e:
        print(f"attnlang: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
