"""Hugging Face transformers: ``attn_implementation="attnlang"`` runs every attention layer through attnlang.

    import attnlang.integrations.transformers as alt
    alt.register()
    config = LlamaConfig(..., attn_implementation="attnlang")
    config.attnlang = {"score": "score + slope[h] * (kv_idx - q_idx)", "mask": "True", "params": {}}
    model = LlamaForCausalLM(config)
    alt.bind_tensors(model, slope=slopes)          # tensors the variant reads (or attnlang_tensors=... per call)

What the model passes is mapped onto the variant, never dropped:
- the model's own pattern stays: the causal flag (``is_causal`` kwarg or ``module.is_causal``) adds the bottom-right
  causal mask ``kv_idx <= q_idx + kv_len - q_len``; ``sliding_window`` adds ``q - kv < window`` as transformers
  defines it; ``softcap`` (Gemma 2's ``attn_logit_softcapping``) replaces ``score`` in the config's score expression
  by ``softcap * tanh(score / softcap)``; ``scaling`` is attnlang's ``scale``; GQA k/v go in unexpanded; learned
  attention sinks passed as ``s_aux`` (gpt-oss: a [Hq] parameter) become the sink ``attnlang_sink[h]``, so their
  gradients flow back to the model's parameter.
- the config's variant (``config.attnlang``: a ``Variant.to_config()`` dict, its JSON / YAML text as
  ``from_config`` takes it, or a list with one per layer, also as JSON / YAML text) is
  combined with that: its score modifies the (soft-capped) score, its mask is and-ed with the model's mask, its sink
  and ``normalize`` are the layer's (a config sink together with the model's ``s_aux`` is an error). Its
  ``q_idx``/``kv_idx``/``q_len``/``kv_len`` are absolute positions in the whole sequence (query ``i`` of a decoding
  step with a KV cache is position ``kv_len - q_len + i``), so ``doc[kv_idx]`` reads a tensor over the whole sequence.
  An error about the config's expression points its caret into the expression as written there (``config.attnlang
  mask expression, line 1, column 6``), not into the rewritten one the call runs.
- padding: the mask function registered in ``AttentionMaskInterface`` under the same name turns the 2-D padding mask
  into a ``[B, seen + q_len]`` bool tensor; each call reads the part for its keys as ``attnlang_pad[b, kv_idx]``
  (never an S x S mask). Without that registration transformers would call attention with ``attention_mask=None``
  and lose padding silently, so a call under a name whose mask function is not attnlang's is an error.
- anything else (dropout while training, a static cache whose keys are not the latest ones, packed sequences or
  mask overlays that transformers builds into its mask function, bidirectional masks, position_bias) is an
  AttnLangError naming it.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from ..ast import Var, children, walk, with_children
from ..errors import AttnLangError
from ..op import call_key, grad_bits, variant_of_op_config
from ..parse import parse
from ..printer import to_source
from ..variant import BACKENDS, Variant, _load_text, from_config
from ..variant import compile as al_compile

__all__ = ["NAME", "register", "attention_forward", "mask_interface", "bind_tensors", "layer_variant"]

NAME = "attnlang"
PAD = "attnlang_pad"
_CAP, _WINDOW, _OFFSET, _SINK = "attnlang_softcap", "attnlang_window", "attnlang_offset", "attnlang_sink"
# keyword arguments models pass that do not change what attention computes
_HARMLESS = {"position_ids", "cache_position", "use_cache", "output_attentions", "return_dict", "layer_idx",
             "position_embeddings", "token_type_ids", "past_key_values", "cache"}


def register(name: str = NAME) -> None:
    """Register attnlang with transformers' AttentionInterface and AttentionMaskInterface under ``name``.

    Raises:
        ImportError: transformers is not installed (``pip install attnlang[transformers]``).
        AttnLangError: ``name`` is not a non-empty string (transformers looks implementations up by string).
    """
    if not isinstance(name, str) or not name.strip():
        raise AttnLangError(f"register() takes the attn_implementation name as a non-empty string, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)


def bind_tensors(model: torch.nn.Module, **tensors: torch.Tensor) -> None:
    """Attach the tensors the config's variants read (e.g. ``slope=...``, ``doc=...``) to every attention layer.

    Tensors passed to a forward call as ``attnlang_tensors={...}`` take precedence.

    Raises:
        AttnLangError: ``model`` is not a torch.nn.Module; a value that is not a tensor; a tensor that no variant
            of ``model.config.attnlang`` reads (as a direct call would).
    """
    if not isinstance(model, torch.nn.Module):
        raise AttnLangError(f"bind_tensors takes the model (a torch.nn.Module) first, got {type(model).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise AttnLangError(f"bind_tensors: tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
    spec = _spec(getattr(model, "config", None))
    if spec is not None:
        specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        read: set = set()
        for i, item in enumerate(specs):
            if item is not None:
                where = f"config.attnlang[{i}]" if isinstance(spec, (list, tuple)) else "config.attnlang"
                read |= set((item if isinstance(item, Variant) else _from_config_at(item, where)).tensor_names)
        extra = sorted(set(tensors) - read)
        if extra:
            raise AttnLangError(f"tensor {extra[0]!r} is given to bind_tensors but no variant of config.attnlang "
                                f"reads it (tensors read: {', '.join(sorted(read)) or 'none'})")
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") or hasattr(module, "is_causal"):
            module._attnlang_tensors = dict(tensors)


# ----- the mask interface: a padding tensor, and a check that the model asks for nothing else -----

def mask_interface(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
                   kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                   local_size: int | None = None, device="cpu", cache_position: torch.Tensor | None = None,
                   **kwargs) -> torch.Tensor | None:
    """transformers' mask hook: bool [batch, kv_offset + kv_length] (True = a real key) or None (no padding).

    transformers 5.x passes q_length and q_offset; older versions pass the query positions as ``cache_position``.

    Raises:
        AttnLangError: a mask pattern other than causal / sliding-window causal (packed sequences, overlays,
            bidirectional), or a cache whose queries are not the last positions of its keys (a static cache).
    """
    if q_length is None and cache_position is not None:
        q_length, q_offset = int(cache_position.shape[0]), int(cache_position[0])
    if q_length is None or kv_length is None:
        raise AttnLangError("transformers called the mask function without q_length / kv_length; this transformers "
                            "version is not supported by attnlang's integration")
    q_offset = int(q_offset)
    if q_offset + q_length != kv_offset + kv_length:
        raise AttnLangError(f"the cache gives queries at positions {q_offset}..{q_offset + q_length - 1} but keys at "
                            f"{kv_offset}..{kv_offset + kv_length - 1}; attnlang's integration needs the queries to be "
                            f"the last keys (a DynamicCache), not a static cache")
    if mask_function is not None:
        _check_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, local_size, device)
    total = kv_offset + kv_length
    if attention_mask is None:
        if kv_offset == 0:
            return None
        return torch.ones(batch_size, total, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise AttnLangError(f"attention_mask of shape {tuple(attention_mask.shape)}: attnlang's integration maps a "
                            f"2-D padding mask [batch, seq_len], not a 4-D one")
    pad = attention_mask.to(device=device, dtype=torch.bool)
    if pad.shape[-1] < total:  # as transformers' prepare_padding_mask: missing keys count as padding
        pad = torch.nn.functional.pad(pad, (0, total - pad.shape[-1]))
    return pad[:, :total].contiguous()


def _check_pattern(mask_function, B, q_length, kv_length, q_offset, kv_offset, local_size, device) -> None:
    """The model's mask function must be plain causal (or sliding-window causal): anything more is not mapped.

    Checked on every (query, key) pair, in blocks of query rows so no more than ~16M booleans exist at once.
    """
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    j = torch.arange(kv_offset, kv_offset + kv_length, device=device).view(1, 1, 1, -1)
    compiling = torch.compiler.is_compiling()
    # under torch.compile one fused comparison (inductor never materialises it), and no loop whose trip count
    # would specialise the graph on the sequence length
    rows = q_length if compiling else max(1, (1 << 24) // max(1, B * kv_length))
    what = "sliding-window causal" if local_size is not None else "causal"
    message = (f"the model's mask is not plain {what} (packed sequences found from position_ids, a chunked or "
               f"token-type overlay, or bidirectional attention): attnlang's integration does not map it; express "
               f"it in config.attnlang instead (e.g. a document mask)")
    for start in range(0, q_length, rows):
        n = min(rows, q_length - start)
        i = torch.arange(q_offset + start, q_offset + start + n, device=device).view(1, 1, -1, 1)
        try:
            got = torch.as_tensor(mask_function(b, h, i, j), device=device).expand(B, 1, n, kv_length)
        except Exception as e:  # not index-based (use_vmap overlays): it cannot be a plain causal mask either
            raise AttnLangError(f"the model's mask function cannot be mapped onto a variant: {e}") from None
        expected = j <= i
        if local_size is not None:
            expected = expected & (i - j < local_size)
        if compiling:
            # a value check inside the compiled graph, without a host sync (a RuntimeError with this message)
            # compared as int8: inductor's value-range analysis of torch 2.11 fails on == of two bool tensors
            # ("A Boolean argument can only be used in Eq and Ne")
            torch._assert_async((got.to(torch.int8) == expected.to(torch.int8)).all(), message)
        elif not bool((got == expected).all()):
            raise AttnLangError(message)


# ----- the attention function -----

def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention hook.

    Args:
        query: [B, Hq, Sq, D]; key, value: [B, Hkv, Skv, D] (after the cache update; Hq a multiple of Hkv).
        attention_mask: what ``mask_interface`` returned: bool [B, seen + Sq] or None.
    Returns:
        (out [B, Sq, Hq, D], None): attention weights are never materialised.
    Raises:
        AttnLangError: something the model asks for that attnlang cannot map (named in the message).
    """
    if dropout and module.training:
        raise AttnLangError(f"dropout={dropout}: attnlang has no attention dropout; train with attention_dropout=0")
    s_aux = kwargs.pop("s_aux", None)
    if s_aux is not None and (not isinstance(s_aux, torch.Tensor) or tuple(s_aux.shape) != (query.shape[1],)):
        raise AttnLangError(f"the model passes s_aux={_short(s_aux)}; attnlang maps learned attention sinks of shape "
                            f"[num_attention_heads] = [{query.shape[1]}] (gpt-oss), not this")
    for name, value_ in kwargs.items():
        if name in _HARMLESS or name == "attnlang_tensors" or value_ is None or value_ is False:
            continue
        raise AttnLangError(f"the model passes {name}={_short(value_)} to attention; attnlang's integration cannot "
                            f"map {name!r}")
    if kwargs.get("output_attentions"):
        raise AttnLangError("output_attentions=True: attnlang never materialises attention weights")
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 2):
        raise AttnLangError(f"attention_mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype}: "
                            f"attnlang expects the [batch, seq_len] bool padding mask its own mask function makes; "
                            f"register() both interfaces under one name")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Skv = key.shape[2]
    offset = 0 if attention_mask is None else attention_mask.shape[-1] - Skv
    if offset < 0:
        raise AttnLangError(f"padding mask covers {attention_mask.shape[-1]} keys but attention gets {Skv}")
    tensors = dict(getattr(module, "_attnlang_tensors", {}) or {})
    tensors.update(kwargs.get("attnlang_tensors") or {})
    config = getattr(module, "config", None)
    # `True if ... else False`, not bool(): under torch.compile offset is symbolic, and a branch makes it a constant
    shifted = True if offset > 0 else False
    kind = (getattr(module, "layer_idx", None), bool(causal), sliding_window, softcap, shifted,
            attention_mask is not None, s_aux is not None)
    if torch.compiler.is_compiling():
        # the variant and the op's key are trace-time constants: Dynamo traces none of attnlang's host code
        variant_key, names = _op_key(_config_view(config), kind, scaling, query.device.type, tuple(sorted(tensors)))
        tensors = _call_tensors(tensors, names, attention_mask, offset, query.device, s_aux)
        named = [tensors[n] for n in sorted(tensors)]
        out, _ = torch.ops.attnlang.attention(query, key, value, named, variant_key,
                                              grad_bits(query, key, value, named))
    else:
        try:
            variant, backend = _layer_call(config, kind, query.device.type)
            tensors = _call_tensors(tensors, variant.tensor_names, attention_mask, offset, query.device, s_aux)
            out = variant(query, key, value, scale=scaling, backend=backend, **tensors)
        except AttnLangError as e:
            raise _at_own_expression(e, config, kind) from None
    return out.transpose(1, 2).contiguous(), None


def _at_own_expression(err: AttnLangError, config, kind: tuple) -> AttnLangError:
    """``err`` with its caret under the config's expression as the user wrote it, when it points into the part of
    the call's variant that came from ``config.attnlang`` (rewritten to call positions by ``_composed``); else
    ``err`` itself (a fault in what the model added, or an error without a position)."""
    where = err.where
    if err.source is None or err.line is None or where not in ("score", "mask", "sink"):
        return err
    try:
        layer = layer_variant(config, kind[0])
    except AttnLangError:
        return err
    own = None if layer is None else {"score": layer.score, "mask": layer.mask, "sink": layer.sink}[where]
    if own is None:
        return err
    try:
        user = parse(own, where)
        composed = parse(err.source, where)
    except AttnLangError:
        return err
    rewritten = _absolute(user, kind[4])
    if where == "score" and kind[3] is not None:
        rewritten = _substitute(rewritten, {"score": parse(f"{_CAP} * tanh(score / {_CAP})", "score")})
    target = next((n for n in walk(composed) if n.span is not None and n.span.line == err.line
                   and n.span.column == err.column and n.span.end - n.span.start == err.length), None)
    if target is None:
        return err
    for part in walk(composed):
        path = _path_to(part, target) if part == rewritten else None
        if path is None:
            continue
        node = user
        for i in path:  # down the user's tree along the same children, up to a name the rewrite replaced
            if isinstance(node, Var) and node.name in _REWRITTEN:
                break
            node = children(node)[i]
        return AttnLangError.at(err.message, own, node.span, where=f"config.attnlang {where}")
    return err


_REWRITTEN = frozenset({"q_idx", "kv_idx", "q_len", "kv_len", "score"})  # names _absolute / softcap replace


def _path_to(root, target) -> list[int] | None:
    """Child indices from ``root`` down to the node ``target`` (by identity), or None when it is not below."""
    stack = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        stack.extend((c, path + [i]) for i, c in enumerate(children(node)))
    return None


def _layer_call(config, kind: tuple, device_type: str) -> tuple[Variant, str]:
    """(variant, backend) of one kind of call: (layer_idx, causal, sliding_window, softcap, shifted, padded,
    model_sink)."""
    _check_mask_registered(config)
    layer_idx, causal, sliding_window, softcap, shifted, padded, model_sink = kind
    layer = layer_variant(config, layer_idx)
    variant = _composed(layer, causal, _opt_int(sliding_window, "sliding_window"), _opt_float(softcap, "softcap"),
                        shifted, padded, model_sink)
    return variant, _backend(config, torch.device(device_type))


_VARIANT_MARK = "__attnlang_variant__"  # a Variant inside a config view: {mark: its op config string}


def _config_view(config):
    """What ``_layer_call`` reads of a transformers config, as plain constants (traced by Dynamo, which passes no
    other object to a trace-time function such as ``_op_key`` in torch 2.11): (the attn implementation's name,
    config.attnlang with each Variant as {mark: its op config}, num_hidden_layers, config.attnlang_options)."""
    if config is None:
        return None
    spec = getattr(config, "attnlang", None)
    if isinstance(spec, Variant):
        spec = {_VARIANT_MARK: spec._op_config}
    elif isinstance(spec, (list, tuple)):
        spec = [{_VARIANT_MARK: item._op_config} if isinstance(item, Variant) else item for item in spec]
    return (getattr(config, "_attn_implementation", None), spec, getattr(config, "num_hidden_layers", None),
            getattr(config, "attnlang_options", None))


class _ViewedConfig:
    """A config rebuilt from ``_config_view``: the attributes ``_layer_call`` reads."""

    def __init__(self, view):
        name, spec, self.num_hidden_layers, self.attnlang_options = view
        self._attn_implementation = name
        self.attnlang = [self._variant(item) for item in spec] if isinstance(spec, list) else self._variant(spec)

    @staticmethod
    def _variant(item):
        if isinstance(item, Mapping) and set(item) == {_VARIANT_MARK}:
            return variant_of_op_config(item[_VARIANT_MARK])
        return item


@torch._dynamo.assume_constant_result
def _op_key(view, kind: tuple, scaling, device_type: str, given: tuple) -> tuple[str, tuple]:
    """(the attnlang op's key, the names of the tensors the variant reads) of one kind of call: run by Dynamo at
    trace time (``assume_constant_result``), never traced. ``view``: ``_config_view`` of the model's config."""
    variant, backend = _layer_call(None if view is None else _ViewedConfig(view), kind, device_type)
    names = variant.tensor_names
    bound = tuple(sorted(n for n in names if n in given or n in (PAD, _OFFSET, _SINK)))
    return call_key(variant._op_config, backend, scaling, False, None, bound), names


def _call_tensors(given: Mapping, names, attention_mask, offset, device, s_aux=None) -> dict:
    """The named tensors of one call: the bound ones the variant reads, the padding mask, the key offset, the
    model's learned sinks."""
    tensors = {n: t for n, t in given.items() if n in names}
    if attention_mask is not None:
        tensors[PAD] = attention_mask[:, offset:]  # the keys this call sees (a sliding cache dropped the first ones)
    if _OFFSET in names:
        tensors[_OFFSET] = torch.tensor([offset], device=device)
    if s_aux is not None:
        tensors[_SINK] = s_aux
    return tensors


def _check_mask_registered(config) -> None:
    name = getattr(config, "_attn_implementation", None)
    if name is None:
        return
    from transformers.masking_utils import AttentionMaskInterface
    if AttentionMaskInterface._global_mapping.get(name) is not mask_interface:
        raise AttnLangError(f"attn_implementation {name!r} runs attnlang's attention but not its mask function, so "
                            f"transformers would drop padding masks; use attnlang.integrations.transformers.register"
                            f"({name!r}), which registers both")


def _backend(config, device: torch.device) -> str:
    """``config.attnlang_options = {"backend": ...}``; default "eager" on the CPU (no compile step), else "auto"."""
    options = getattr(config, "attnlang_options", None) if config is not None else None
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise AttnLangError(f"config.attnlang_options must be a mapping, got {type(options).__name__}")
    unknown = [k for k in options if k != "backend"]
    if unknown:
        raise AttnLangError(f"unknown key {unknown[0]!r} in config.attnlang_options; expected keys: backend")
    backend = options.get("backend")
    if backend is None:
        return "eager" if device.type == "cpu" else "auto"
    if backend not in BACKENDS:
        raise AttnLangError(f"config.attnlang_options 'backend' is {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def layer_variant(config, layer_idx: int | None) -> Variant | None:
    """The variant ``config.attnlang`` gives layer ``layer_idx``: one config for all layers, or a list; None if absent.

    Raises:
        AttnLangError: a bad config (naming the key), or a list whose length is not the number of layers.
    """
    spec = _spec(config)
    if spec is None:
        return None
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, (list, tuple)):
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and len(spec) != layers:
            raise AttnLangError(f"config.attnlang is a list of {len(spec)} per-layer variants but the model has "
                                f"{layers} layers (num_hidden_layers); give one per layer, None for the model's own")
        if layer_idx is None or not 0 <= layer_idx < len(spec):
            raise AttnLangError(f"config.attnlang is a list of {len(spec)} per-layer variants but this attention "
                                f"layer has index {layer_idx}")
        item = spec[layer_idx]
        if item is None:
            return None
        return item if isinstance(item, Variant) else _from_config_at(item, f"config.attnlang[{layer_idx}]")
    return _from_config_at(spec, "config.attnlang")


def _spec(config):
    """``config.attnlang`` with JSON / YAML text read as ``from_config`` reads it: a list of per-layer configs
    (a tuple), or the text itself (one config, read by ``from_config``); anything else as it is."""
    spec = getattr(config, "attnlang", None) if config is not None else None
    if isinstance(spec, (str, bytes)):
        return _spec_text(spec)
    return spec


@functools.lru_cache(maxsize=64)
def _spec_text(text):
    try:
        loaded = _load_text(text)
    except AttnLangError as e:
        raise AttnLangError(f"config.attnlang: {e}") from None
    if isinstance(loaded, list):
        return tuple(loaded)
    return text


def _from_config_at(spec, where: str) -> Variant:
    key = _freeze(spec)
    try:
        return _from_config_cached(key) if key is not None else from_config(spec)
    except AttnLangError as e:
        raise AttnLangError(f"{where}: {e}") from None


@functools.lru_cache(maxsize=256)
def _from_config_cached(key) -> Variant:
    return from_config(_thaw(key))


def _freeze(spec):
    if isinstance(spec, str):
        return ("text", spec)
    if isinstance(spec, Mapping):
        try:
            items = tuple(sorted((str(k), _freeze(v) if isinstance(v, Mapping) else v) for k, v in spec.items()))
            hash(items)
        except TypeError:
            return None
        return ("map", items)
    return None


def _thaw(key):
    kind, body = key
    if kind == "text":
        return body
    return {k: _thaw(v) if isinstance(v, tuple) and v and v[0] == "map" else v for k, v in body}


# ----- composing the model's attention with the config's variant -----

@functools.lru_cache(maxsize=1024)
def _composed(layer: Variant | None, causal: bool, window: int | None, cap: float | None, shifted: bool,
              padded: bool, model_sink: bool = False) -> Variant:
    """One variant for one kind of call; the config's expressions rewritten from absolute to call positions.

    ``shifted``: the keys start at an absolute position > 0 (a sliding cache dropped the first ones), read at call
    time from the int64 [1] tensor ``attnlang_offset``, so decoding steps share one compiled variant.
    """
    params: dict[str, Any] = dict(layer.params) if layer is not None else {}
    score_src, mask_src = (layer.score, layer.mask) if layer is not None else ("score", "True")
    layer_sink = layer.sink if layer is not None else None
    reserved = [n for n in (_CAP, _WINDOW, _OFFSET, PAD, _SINK)
                if n in params or n in score_src + mask_src + (layer_sink or "")]
    if reserved:
        raise AttnLangError(f"config.attnlang uses the reserved name {reserved[0]!r}")
    if model_sink and layer_sink is not None:
        raise AttnLangError("config.attnlang has a sink and the model passes its own learned sinks (s_aux); give "
                            "one of them")
    sink = f"{_SINK}[h]" if model_sink else None
    if layer_sink is not None:
        sink = to_source(_absolute(parse(layer_sink, "sink"), shifted))
    score = _absolute(parse(score_src, "score"), shifted)
    mask = _absolute(parse(mask_src, "mask"), shifted)
    if cap is not None:
        score = _substitute(score, {"score": parse(f"{_CAP} * tanh(score / {_CAP})", "score")})
        params[_CAP] = cap
    parts = [f"({to_source(mask)})"] if mask_src.strip() != "True" else []
    if causal:
        parts.append("kv_idx <= q_idx + kv_len - q_len")
    if window is not None:
        parts.append(f"q_idx + kv_len - q_len - kv_idx < {_WINDOW}")
        params[_WINDOW] = window
    if padded:
        parts.append(f"{PAD}[b, kv_idx]")
    return al_compile(to_source(score), " & ".join(parts) or "True", params, sink=sink,
                      normalize=layer.normalize if layer is not None else True)


def _absolute(expr, shifted: bool):
    """Absolute positions in call terms: keys start at the offset, queries are the last ``q_len`` of them."""
    off = f" + {_OFFSET}[0]" if shifted else ""
    table = {"q_idx": parse(f"q_idx + kv_len - q_len{off}"), "kv_idx": parse(f"kv_idx{off}"),
             "q_len": parse(f"kv_len{off}"), "kv_len": parse(f"kv_len{off}")}
    return _substitute(expr, table)


def _substitute(expr, table: Mapping[str, Any]):
    if isinstance(expr, Var):
        return table.get(expr.name, expr)
    kids = children(expr)
    if not kids:
        return expr
    return with_children(expr, tuple(_substitute(c, table) for c in kids))


def _opt_int(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnLangError(f"{name}={value!r}: expected a positive int")
    return value


def _opt_float(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AttnLangError(f"{name}={value!r}: expected a positive number")
    return float(value)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
