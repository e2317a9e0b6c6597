"""What attnlang knows about a variant, as text: the report behind ``Variant.explain()``, built from the variant's
parts (sources, checked and simplified expressions), so this stage never needs the Variant itself."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Mapping

from .ast import Const, DType, Index, names_used, walk
from .check import Checked, check_named_tensor
from .errors import AttnLangError
from .patterns import documents, recognize
from .printer import to_program, to_source
from .simplify import Simplified
from .sparsity import _as_block_size, known_exact, mask_block_sparsity, positive_int

__all__ = ["explain"]


def _native(simplified: Simplified) -> str | None:
    return recognize(simplified.score, simplified.mask).description()


def _depends(expr) -> str:
    used = sorted(names_used(expr) & {"b", "h", "q_idx", "kv_idx", "q_len", "kv_len"})
    return ", ".join(used) or "nothing"


def _sparsity_class(mask) -> str:
    """What kind of block structure the simplified mask has, without lengths."""
    if isinstance(mask, Const):
        return ("dense: every pair attends (no block is skipped)" if mask.value else
                "empty: no pair attends (every row gives out = 0, lse = -inf)")
    used = names_used(mask)
    heads = "; varies with b/h" if used & {"b", "h"} else ""
    if any(isinstance(n, Index) for n in walk(mask)):
        return ("data-dependent: blocks are classified from the values of the tensors the mask reads, per call"
                + heads)
    if known_exact(mask):
        return "static, exact: block kinds follow from the lengths alone (affine in the positions)" + heads
    return "static: block kinds follow from the lengths; partial blocks are refined by evaluation" + heads


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module whose __spec__ is None
        return False


def _auto_policy() -> str:
    lines = []
    try:
        import torch
        cuda = torch.cuda.is_available()
        if cuda:
            major, minor = torch.cuda.get_device_capability()
            lines.append(f"this machine: CUDA device {torch.cuda.get_device_name()} (sm{major}{minor})")
        else:
            lines.append("this machine: no CUDA device")
    except Exception:  # pragma: no cover - torch is a dependency
        cuda = False
    for name in ("fa4", "flex"):
        try:
            importlib.import_module(f"attnlang.backends.{name}")
        except ImportError as e:
            lines.append(f"{name} backend: not available ({e})")
            continue
        # attnlang.backends.fa4 imports flash_attn only when it runs: importable, it says nothing of FA4 itself
        if name == "fa4" and not _installed("flash_attn"):
            lines.append("fa4 backend: not available (flash-attn-4 is not installed: pip install 'attnlang[gpu]')")
        elif name == "fa4" and not cuda:
            lines.append("fa4 backend: flash-attn-4 installed, but FA4 needs a CUDA GPU")
        else:
            lines.append(f"{name} backend: available")
    return "; ".join(lines)


def explain(score: str, mask: str, params: Mapping[str, object], checked: Checked, simplified: Simplified,
            q_len: int | None = None, kv_len: int | None = None, normalize: bool = True,
            tensors: Mapping[str, object] | None = None, block_size=(128, 128)) -> str:
    """A report: the variant as written (``score``, ``mask``, ``params``), parsed (``checked``), simplified (with
    the rules that fired), its types and tensors, its mask's structure (native lowering, block density for given
    lengths) and the backend "auto" would pick.

    ``tensors``: the named tensors (torch tensors, by name), checked as a call checks them; with lengths, a mask
    that reads tensors gets its block sparsity from their values (for batch 0 and head 0 when it reads ``b`` /
    ``h``). ``block_size``: an int or (query, key) pair of ints, the blocks of that report (default 128 x 128).

    Raises:
        AttnLangError: a length that is not a positive int, a bad block size, a tensor the variant does not read
            or of the wrong number of dimensions.
    """
    tensors = dict(tensors or {})
    for name, t in tensors.items():
        check_named_tensor(name, t, checked.tensors)
    block_size = _as_block_size(block_size)
    if q_len is not None:
        q_len = positive_int("q_len", q_len)
    if kv_len is not None:
        kv_len = positive_int("kv_len", kv_len)
    if (q_len is None) != (kv_len is None):  # one length given: both sequences have it
        q_len = kv_len = q_len if q_len is not None else kv_len
    simple = simplified
    out = ["attnlang variant", "  as written:"]
    out.append("    score: " + score.replace("\n", "\n           "))  # bindings on their own lines
    out.append("    mask:  " + mask.replace("\n", "\n           "))
    if checked.sink is not None:
        out.append("    sink:  " + checked.sources["sink"].replace("\n", "\n           "))
    if not normalize:
        out.append("    normalize: False (out is the softmax's numerator alone: sum of exp(score) * v, weights >= 0, "
                   "so a negative weight such as GELU activation attention's cannot be expressed)")
    if params:
        out.append("    params: " + ", ".join(f"{k}={v!r}" for k, v in sorted(params.items())))
    avoid = tuple(params)  # repeated subexpressions print as bindings t1 = ...; (never a param's name)
    out.append("  parsed (canonical):")
    out.append(f"    score: {to_program(checked.score, avoid)}")
    out.append(f"    mask:  {to_program(checked.mask, avoid)}")
    if checked.sink is not None:
        out.append(f"    sink:  {to_program(checked.sink, avoid)}")
    out.append("  simplified:")
    out.append(f"    score: {to_program(simple.score, avoid)}")
    out.append(f"    mask:  {to_program(simple.mask, avoid)}")
    if checked.sink is not None:
        sink = to_program(simple.sink, avoid) if simple.sink is not None else "none (-inf adds nothing)"
        out.append(f"    sink:  {sink}")
    if simple.lse_shift is not None:
        out.append(f"    lse shift (dropped from the score, added back to lse): {to_source(simple.lse_shift)}")
    if simple.trace:
        out.append("    rules that fired: " + ", ".join(simple.trace))
    else:
        out.append("    rules that fired: none")
    out.append("  types:")
    st = checked.score.dtype
    out.append(f"    score: {'float' if st in (DType.FLOAT, DType.INT) else 'set by tensor dtypes at call time'}"
               f"; depends on {_depends(checked.score)}")
    out.append(f"    mask:  bool; depends on {_depends(checked.mask)}")
    if checked.sink is not None:
        out.append(f"    sink:  float (one extra key per row, no value); depends on {_depends(checked.sink)}")
    if checked.tensors:
        out.append("    tensors (bound at call time): " + ", ".join(
            f"{n} ({d} index{'es' if d != 1 else ''})" for n, d in sorted(checked.tensors.items())))
    else:
        out.append("    tensors: none")
    out.append(f"  sparsity class: {_sparsity_class(simple.mask)}")
    native = _native(simple)
    if native is not None:
        out.append(f"  native lowering: {native}")
    docs = documents(simple.mask)
    if docs is not None:
        out.append(f"  {docs.description()}: fa4 runs the documents as FA4 varlen sequences (cu_seqlens derived "
                   f"from {docs.tensor!r} per call) when q_len == kv_len and every id fills one contiguous run "
                   f"(else tile lists): the backward always, the forward on long packs "
                   f"(kernel_options={{'varlen': True / False}} forces either path)")
    mask_tensors = sorted({n.tensor for n in walk(simple.mask) if isinstance(n, Index)})
    missing = [n for n in mask_tensors if n not in tensors]
    if q_len is None and mask_tensors and not missing:
        out.append("  block sparsity: not computed (give the lengths: explain(q_len=N, kv_len=M, ...) or --q-len N "
                   "--kv-len M)")
    elif q_len is not None and kv_len is not None and missing:
        out.append(f"  block sparsity at q_len={q_len}, kv_len={kv_len}: not computed (the mask reads tensor "
                   f"{missing[0]!r}: pass it, explain({missing[0]}=...) or --tensor {missing[0]}=FILE)")
    elif q_len is not None and kv_len is not None:
        first = " (batch 0, head 0)" if mask_tensors and names_used(simple.mask) & {"b", "h"} else ""
        try:
            bs = mask_block_sparsity(simple.mask, checked.tensors, checked.sources, q_len, kv_len, 1, 1, block_size,
                                     {n: tensors[n] for n in mask_tensors})
            kinds = bs.kind
            total = kinds.numel()
            counts = [int((kinds == k).sum()) for k in (0, 1, 2)]
            of = f" (from the values of {', '.join(mask_tensors)})" if mask_tensors else ""
            out.append(f"  block sparsity at q_len={q_len}, kv_len={kv_len}{first}{of}, blocks "
                       f"{tuple(bs.block_size)}: {counts[0]} empty, {counts[1]} partial, {counts[2]} full of "
                       f"{total}; density {bs.density:.4f}")
        except AttnLangError as e:  # e.g. the lengths are valid but too long to classify in these blocks
            hint = (" (explain(..., block_size=N) or --block-size N)" if "block_size" in e.message else "")
            out.append(f"  block sparsity at q_len={q_len}, kv_len={kv_len}: not computed ({e.message}{hint})")
    out.append(f"  backend auto: on CUDA, fa4 (Hopper) when it supports the call, else flex; on the CPU, eager "
               f"({_auto_policy()})")
    out.append("  fa4 host calls: from a call signature's fourth call on, FA4's recorded allocations and kernel "
               "launches replay without FA4's Python, once checked against FA4's own call on the device "
               "(kernel_options={'replay': False} turns it off)")
    return "\n".join(out)
