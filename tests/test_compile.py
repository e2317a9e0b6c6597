"""attnlang inside torch.compile (attnlang.op): one custom op per call, 0 graph breaks with fullgraph=True, the
compiled result and gradients equal to the uncompiled ones, trace-time checks as AttnLangError, value checks at run
time. CPU compile is slow on 2 cores: most tests use backend="aot_eager" (Dynamo + AOTAutograd, no code
generation); one uses inductor."""

from __future__ import annotations

import operator

import pytest
import torch

import attnlang as al
from attnlang import op

ALIBI = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
T5 = al.compile(score="score + rel[h, clamp(q_idx - kv_idx + 8, 0, 16)]", mask="q_idx >= kv_idx")
DECODE = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")


class Biased(torch.nn.Module):
    """A module calling a variant with a learned per-head tensor."""

    def __init__(self, variant, name, shape, backend="eager"):
        super().__init__()
        self.variant, self.name, self.backend = variant, name, backend
        self.table = torch.nn.Parameter(torch.rand(*shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, q, k, v):
        out, lse = self.variant(q, k, v, backend=self.backend, return_lse=True, **{self.name: self.table})
        return out, lse


def _qkv(B=2, Hq=4, Hkv=2, Sq=19, Skv=19, D=16, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _grads(module, q, k, v):
    out, lse = module(q, k, v)
    (out.square().sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v, module.table)]
    for t in (q, k, v, module.table):
        t.grad = None
    return out.detach(), lse.detach(), grads


def test_zero_graph_breaks_one_op_and_equal_gradients():
    module = Biased(ALIBI, "slope", (4,))
    q, k, v = _qkv()
    explained = torch._dynamo.explain(module)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    nodes = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnlang.attention.default in nodes or torch.ops.attnlang.attention in nodes
    ref = _grads(module, q, k, v)
    torch._dynamo.reset()
    got = _grads(torch.compile(module, fullgraph=True, backend="aot_eager"), q, k, v)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b)
    assert got[2][3].abs().sum() > 0  # the learned slope gets a gradient


def test_the_backward_reuses_the_forward_graph(monkeypatch):
    """One backend forward per training step: the op's backward runs the backend's backward on the graph its
    forward kept (no recompute), and keeps nothing afterwards."""
    module = Biased(ALIBI, "slope", (4,))
    q, k, v = _qkv()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    _grads(compiled, q, k, v)  # compile
    runs = []
    real = op._run
    monkeypatch.setattr(op, "_run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    ref = _grads(module, q, k, v)
    got = _grads(compiled, q, k, v)
    assert len(runs) == 1 and len(op.GRAPHS) == 0
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b)


def test_inductor_compiles_the_op_forward_and_backward():
    module = Biased(T5, "rel", (4, 17))
    q, k, v = _qkv(Sq=13, Skv=21)
    ref = _grads(module, q, k, v)
    torch._dynamo.reset()
    got = _grads(torch.compile(module, fullgraph=True), q, k, v)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flex_on_the_cpu_inside_compile():
    q, k, v = _qkv(grad=False, Sq=5, Skv=33)

    def step(q, k, v):
        return DECODE(q, k, v, backend="flex")

    with torch.no_grad():
        ref = step(q, k, v)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got, DECODE(q, k, v, backend="eager"), rtol=2e-5, atol=2e-5)


def test_lengths_change_without_graph_breaks():
    """Decoding: kv_len grows every call; Dynamo's automatic dynamic shapes give one graph for every length."""
    step = torch.compile(lambda q, k, v: DECODE(q, k, v, backend="eager"), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for kv_len in (7, 8, 9, 12):
            q, k, v = _qkv(Sq=1, Skv=kv_len, grad=False, seed=kv_len)
            torch.testing.assert_close(step(q, k, v), DECODE(q, k, v, backend="eager"))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_trace_time_checks_raise_attnlang_errors(fullgraph):
    q, k, v = _qkv(grad=False)
    compiled = torch.compile(lambda q, k, v, rel: T5(q, k, v, rel=rel), fullgraph=fullgraph, backend="aot_eager")
    with pytest.raises(al.AttnLangError, match="3 dimensions"):
        compiled(q, k, v, torch.zeros(4, 17, 1))
    with pytest.raises(al.AttnLangError, match="multiple of key/value heads"):
        compiled(q, k[:, :1].expand(2, 3, 19, 16), v[:, :1].expand(2, 3, 19, 16), torch.zeros(4, 17))
    index = al.compile(score="score + rel[h, pos[kv_idx]]")
    compiled = torch.compile(lambda q, k, v, rel, pos: index(q, k, v, rel=rel, pos=pos), fullgraph=fullgraph,
                             backend="aot_eager")
    with pytest.raises(al.AttnLangError) as err:  # a float tensor as an index: a typing error, with its caret
        compiled(q, k, v, torch.zeros(4, 19), torch.zeros(19))
    assert "^" in str(err.value) and err.value.column is not None


def test_value_checks_run_inside_the_compiled_graph():
    """Index bounds from the tensor's values are checked at run time, on every new tensor (nothing is skipped)."""
    index = al.compile(score="score + rel[h, pos[kv_idx]]")
    compiled = torch.compile(lambda q, k, v, rel, pos: index(q, k, v, rel=rel, pos=pos), fullgraph=True,
                             backend="aot_eager")
    q, k, v = _qkv(grad=False)
    rel = torch.randn(4, 19)
    pos = torch.arange(19)
    torch.testing.assert_close(compiled(q, k, v, rel, pos), index(q, k, v, rel=rel, pos=pos))
    pos[3] = 19  # in place: a new version of the same tensor
    with pytest.raises(al.AttnLangError, match="can take values"):
        compiled(q, k, v, rel, pos)


def test_declared_value_ranges_replace_the_read_and_are_checked(monkeypatch):
    """kernel_options={"value_ranges": {name: (lo, hi)}}: the bounds check uses the declared range (no read, so no
    sync in a CUDA-graph capture), the values are still checked against it, and the range must prove the bounds."""
    import attnlang.variant as variant_module
    index = al.compile(score="score + rel[h, pos[kv_idx]]")
    q, k, v = _qkv(grad=False)
    rel, pos = torch.randn(4, 19), torch.arange(19)
    ref = index(q, k, v, rel=rel, pos=pos)
    monkeypatch.setattr(variant_module, "_value_range", lambda t: pytest.fail("a declared range was read"))
    options = {"value_ranges": {"pos": (0, 18), "rel": (-10.0, 10.0)}}
    torch.testing.assert_close(index(q, k, v, rel=rel, pos=pos, kernel_options=options), ref)
    compiled = torch.compile(lambda q, k, v, rel, pos: index(q, k, v, rel=rel, pos=pos, kernel_options=options),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, rel, pos), ref)
    monkeypatch.undo()
    with pytest.raises(al.AttnLangError, match="outside its declared value_ranges"):
        index(q, k, v, rel=rel, pos=pos * 0 - 1, kernel_options={"value_ranges": {"pos": (0, 18)}})
    with pytest.raises(al.AttnLangError, match="can take values"):  # the declared range proves nothing
        index(q, k, v, rel=rel, pos=pos, kernel_options={"value_ranges": {"pos": (0, 19)}})
    for bad in ({"nope": (0, 1)}, {"pos": (3, 1)}, {"pos": "0..18"}, [("pos", (0, 18))]):
        with pytest.raises(al.AttnLangError, match="value_ranges"):
            index(q, k, v, rel=rel, pos=pos, kernel_options={"value_ranges": bad})


def test_the_key_is_rebuilt_in_a_process_that_did_not_trace():
    key = op.call_key(ALIBI._op_config, "eager", 0.5, True, {"chunk": 1}, ("slope",))
    spec = op._SPECS.pop(key)
    rebuilt = op.spec_of(key)
    assert rebuilt[0] == ALIBI and rebuilt[1:] == spec[1:]
    with pytest.raises(al.AttnLangError, match="did not make"):
        op.spec_of("not json")


def test_the_op_runs_outside_compile_with_the_fake_layout():
    q, k, v = _qkv(grad=False)
    key = op.call_key(DECODE._op_config, "eager", None, True, None, ())
    out, lse = torch.ops.attnlang.attention(q, k, v, [], key, 0)
    ref, ref_lse = DECODE(q, k, v, backend="eager", return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = op._attention_fake(*(mode.from_tensor(t) for t in (q, k, v)), [], key, 0)
    assert [t.stride() for t in fake] == [out.stride(), lse.stride()]
    assert [t.dtype for t in fake] == [out.dtype, lse.dtype]


transformers = pytest.importorskip("transformers")


def test_transformers_models_compile_with_fullgraph():
    """Llama (prefill and cached decoding) and Gemma 2 (soft-capping, sliding window; prefill) in
    torch.compile(model, fullgraph=True) give the uncompiled logits."""
    from transformers import DynamicCache, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    import attnlang.integrations.transformers as alt
    alt.register()
    small = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_implementation="attnlang")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**small)).eval()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, sliding_window=5, attn_logit_softcapping=50.0,
                                           query_pre_attn_scalar=16)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(llama.train(), fullgraph=True, backend="aot_eager")
    for model in (llama, compiled):  # a training step: gradients through the op's backward
        model(ids, labels=ids).loss.backward()
    weights = [p for p in llama.parameters() if p.grad is not None]
    grads = [p.grad.clone() / 2 for p in weights]  # the eager and the compiled step accumulated the same gradient
    llama.zero_grad()
    llama(ids, labels=ids).loss.backward()
    for p, g in zip(weights, grads):
        torch.testing.assert_close(p.grad, g)
    llama.eval().zero_grad()
    with torch.no_grad():
        for model, steps in ((llama, 2), (gemma, 0)):
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            eager_cache, compiled_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
            ref = model(ids, past_key_values=eager_cache, use_cache=True).logits
            got = compiled(ids, past_key_values=compiled_cache, use_cache=True).logits
            torch.testing.assert_close(got, ref)
            token = ref[:, -1:].argmax(-1)
            for _ in range(steps):
                ref = model(token, past_key_values=eager_cache, use_cache=True).logits
                got = compiled(token, past_key_values=compiled_cache, use_cache=True).logits
                torch.testing.assert_close(got, ref)
                token = ref[:, -1:].argmax(-1)


@pytest.mark.parametrize("spec", ["variant", "per_layer"])
def test_transformers_config_variants_compile_with_fullgraph(spec):
    """config.attnlang as a Variant object or a per-layer list (a Variant, a dict) compiles with fullgraph: the
    trace-time key sees the config only as constants (torch 2.11's Dynamo passes no objects to such functions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import attnlang.integrations.transformers as alt
    alt.register()
    window = al.compile(mask="q_idx - kv_idx < 4")
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         attn_implementation="attnlang")
    config.attnlang = window if spec == "variant" else [window, {"score": "score * 0.5"}]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got, ref)


SCHEMAS = {
    "attention": "attnlang::attention(Tensor q, Tensor k, Tensor v, Tensor[] tensors, str key, SymInt wanted) -> "
                 "(Tensor, Tensor)",
    "attention_backward": "attnlang::attention_backward(Tensor q, Tensor k, Tensor v, Tensor[] tensors, Tensor out, "
                          "Tensor lse, Tensor grad_out, Tensor grad_lse, str key, SymInt wanted) -> "
                          "(Tensor, Tensor, Tensor, Tensor[])",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_op_schemas_and_tags(name):
    overload = getattr(torch.ops.attnlang, name).default
    assert str(overload._schema) == SCHEMAS[name]
    assert torch.Tag.pt2_compliant_tag in overload.tags


def test_the_op_called_directly_with_gradients(monkeypatch):
    """The op in eager mode with inputs that need gradients (its autograd kernel): one backend forward, gradients
    to q, k, v and the named tensor equal to the variant's own, nothing kept afterwards; a double backward is an
    AttnLangError."""
    module = Biased(ALIBI, "slope", (4,))
    q, k, v = _qkv()
    ref = _grads(module, q, k, v)
    key = op.call_key(ALIBI._op_config, "eager", None, True, None, ("slope",))
    runs = []
    real = op._run
    monkeypatch.setattr(op, "_run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    out, lse = torch.ops.attnlang.attention(q, k, v, [module.table], key, 15)
    (out.square().sum() + lse.sum()).backward()
    assert len(runs) == 1 and len(op.GRAPHS) == 0
    torch.testing.assert_close(out.detach(), ref[0])
    torch.testing.assert_close(lse.detach(), ref[1])
    for t, g in zip((q, k, v, module.table), ref[2]):
        torch.testing.assert_close(t.grad, g)
    out, lse = torch.ops.attnlang.attention(q, k, v, [module.table], key, 15)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(al.AttnLangError, match="double backward"):
        dq.sum().backward()


def test_the_op_kernels_are_never_traced_by_dynamo():
    """The op run eagerly below an active torch.compile (from a frame Dynamo skips): Dynamo traces none of
    attnlang's code (its kernels are marked skipped, recursively), forward and backward."""
    key = op.call_key(DECODE._op_config, "eager", None, False, None, ())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    @torch._dynamo.disable(recursive=False)
    def eager_part(x):
        return torch.ops.attnlang.attention(x, x, x, [], key, 1 if x.requires_grad else 0)[0]

    torch._dynamo.reset()
    for grad in (False, True):
        x = torch.randn(1, 2, 5, 8).requires_grad_(grad)
        out = torch.compile(lambda x: eager_part(x) * 2, backend=backend)(x)
        if grad:
            out.sum().backward()
            assert x.grad is not None
        torch.testing.assert_close(out, DECODE(x, x, x, backend="eager") * 2)
    assert len(graphs) == 2  # the two lambdas' `* 2`, nothing from attnlang
    assert all(n.target in (torch.ops.aten.mul.Tensor, operator.mul)
               for g in graphs for n in g.graph.nodes if n.op == "call_function")


def test_the_first_compiled_run_reaches_the_backend_with_python_dispatch_keys(monkeypatch):
    """A compiled training graph's first run calls the op with PythonTLSSnapshot / Functionalize / PreDispatch
    excluded; the backend must see them back (a nested torch.compile there, flex's own, makes fake tensors that
    need PythonTLSSnapshot: without it PyTorch asserts "tls_on_entry.has_value()" on the H200)."""
    import attnlang.backends.eager as eager_backend
    names = ("PythonTLSSnapshot", "Functionalize", "PreDispatch")
    seen = []
    real = eager_backend.attention

    def recording(q, k, v, plan):
        excluded = torch._C._dispatch_tls_local_exclude_set()
        seen.append([n for n in names if excluded.has(getattr(torch._C.DispatchKey, n))])
        return real(q, k, v, plan)
    monkeypatch.setattr(eager_backend, "attention", recording)
    module = Biased(ALIBI, "slope", (4,))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        _grads(compiled, *_qkv())
    assert seen and all(not got for got in seen), seen


def test_dispatch_plain_sees_every_restored_key():
    """The fast check (one AND on the excluded keys' bits) agrees with _dispatch_restored's key by key test."""
    assert op._dispatch_plain()
    for key in op._KEYS:
        with torch._C._SetExcludeDispatchKeyGuard(key, True):
            assert not op._dispatch_plain(), key
            with op._dispatch_restored():
                assert op._dispatch_plain(), key
    with torch._C._AutoDispatchBelowAutograd():
        assert not op._dispatch_plain()

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not op._dispatch_plain()


def test_activation_checkpointing_inside_compile(monkeypatch):
    """torch.utils.checkpoint around a variant call under torch.compile: the backward recomputes the op (a forward
    in the backward graph) and runs its backward on the recomputed graph (AOTAutograd drops the recomputed output
    first: the orphaned entry is still found), so two backend forwards per step, not three; gradients equal the
    uncompiled ones, nothing kept after."""
    import torch.utils.checkpoint as checkpointing
    slope = torch.rand(4, requires_grad=True)

    def step(q, k, v):
        block = lambda q, k, v: ALIBI(q, k, v, backend="eager", slope=slope).square().sum()  # noqa: E731
        return checkpointing.checkpoint(block, q, k, v, use_reentrant=False)

    q, k, v = _qkv(Sq=9, Skv=9)

    def grads(fn):
        fn(q, k, v).backward()
        got = [t.grad.clone() for t in (q, k, v, slope)]
        for t in (q, k, v, slope):
            t.grad = None
        return got

    ref = grads(step)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads(compiled)  # compile
    runs = []
    real = op._run
    monkeypatch.setattr(op, "_run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    got = grads(compiled)
    assert len(runs) == 2 and len(op.GRAPHS) == 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_the_output_dropped_before_the_backward_keeps_its_graph(monkeypatch):
    """f(q).sum().backward() where f's output is the op's own: autograd keeps only a copy of it, the op's output
    dies before the backward, and the backward still runs on the forward's graph (one backend forward)."""
    slope = torch.rand(4, requires_grad=True)
    compiled = torch.compile(lambda q, k, v: ALIBI(q, k, v, backend="eager", slope=slope), fullgraph=True,
                             backend="aot_eager")
    q, k, v = _qkv()
    compiled(q, k, v).sum().backward()  # compile
    ref = [t.grad.clone() for t in (q, k, v, slope)]
    runs = []
    real = op._run
    monkeypatch.setattr(op, "_run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    compiled(q, k, v).sum().backward()
    assert len(runs) == 1 and len(op.GRAPHS) == 0
    for t, g in zip((q, k, v, slope), ref):
        torch.testing.assert_close(t.grad, 2 * g)


def test_graphs_entries_go_with_their_output():
    """An entry is taken once; when its output dies it becomes the orphan, released when the next orphan comes or
    the next forward puts an entry."""
    import weakref

    class Graph:
        pass

    first, second = Graph(), Graph()
    out = torch.empty(2, 19, 4, 16).transpose(1, 2)
    op.GRAPHS.put(out, (first,))
    assert len(op.GRAPHS) == 1 and op.GRAPHS.take(out.detach()) == (first,) and len(op.GRAPHS) == 0
    assert op.GRAPHS.take(out) is None  # taken once
    op.GRAPHS.put(out, (first,))
    alias = out.detach()
    del out
    assert len(op.GRAPHS) == 1  # the orphan
    other = torch.empty(3, 5)
    op.GRAPHS.put(other, (second,))
    gone = weakref.ref(first)
    del first, other  # the next orphan replaces the first
    assert gone() is None and len(op.GRAPHS) == 1
    assert op.GRAPHS.take(alias) is None  # released
    gone = weakref.ref(second)
    del second
    op.GRAPHS.put(alias, ("new",))  # a new forward releases the orphan
    assert gone() is None and op.GRAPHS.take(alias) == ("new",) and len(op.GRAPHS) == 0


@pytest.mark.parametrize("grad", [True, False])
def test_torch_library_opcheck(grad):
    """torch.library.opcheck of the forward op (schema, fake tensors, autograd registration, AOT dispatch with
    dynamic shapes), with and without gradients."""
    q, k, v = _qkv(Sq=9, Skv=9, grad=grad)
    slope = torch.rand(4, requires_grad=grad)
    key = op.call_key(ALIBI._op_config, "eager", None, True, None, ("slope",))
    torch.library.opcheck(torch.ops.attnlang.attention.default, (q, k, v, [slope], key, 15 if grad else 0))


def test_a_kept_graph_goes_when_its_backward_never_runs(monkeypatch):
    """A forward with gradients whose backward never runs, where the backend's output needs no gradient: the
    op's output is still a tensor apart from the kept one, so the entry goes with it (to the orphan slot, released
    by the next forward) rather than holding itself alive."""
    import weakref

    import attnlang.backends.eager as eager_backend
    def kernel(q, k, v, plan):  # an output in the promised layout, no gradient
        B, H, S, D = q.shape
        return torch.empty(B, S, H, D).transpose(1, 2).copy_(q.detach()), None

    monkeypatch.setattr(eager_backend, "attention", kernel)
    q, k, v = _qkv()
    key = op.call_key(DECODE._op_config, "eager", None, False, None, ())
    with torch.no_grad():
        out, _ = torch.ops.attnlang.attention.default(q, k, v, [], key, 7)  # as a compiled forward calls it
    kept = weakref.ref(op.GRAPHS._entries[op.GRAPHS._key(out)][1][0])
    del out
    assert not op.GRAPHS._entries and op.GRAPHS._orphan is not None and kept() is not None
    other = torch.empty(3)
    op.GRAPHS.put(other, ("next forward",))
    assert kept() is None and op.GRAPHS.take(other) == ("next forward",) and len(op.GRAPHS) == 0


def test_training_calls_through_the_op_reuse_the_warm_plan(monkeypatch):
    """A named tensor without gradients reaches the backend as itself in a training call through the op: the warm
    plan (and with it the backends' per-plan memos: cu_seqlens, aux conversions, FA4's replays) is reused from
    the second call on. A new detached alias per call planned every training call again."""
    docs = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 9, 5]))
    key = op.call_key(docs._op_config, "eager", None, True, None, ("doc",))
    plans = []
    real = type(docs)._plan
    monkeypatch.setattr(type(docs), "_plan", lambda self, *a, **kw: plans.append(1) or real(self, *a, **kw))
    for _ in range(3):
        q, k, v = _qkv()
        out, lse = torch.ops.attnlang.attention(q, k, v, [doc], key, 7)
        out.sum().backward()
        assert q.grad is not None and k.grad is not None
    assert len(plans) == 1


@pytest.mark.parametrize("B, Skv", [(0, 7), (2, 0)])
def test_empty_calls_inside_compile(B, Skv):
    """An empty batch, and no keys with a sink (whose rows' lse is the sink): the op's real implementation reaches
    the same empty result as the eager call, with gradients (the sink's tensor gets d lse / d sink = 1 per row)."""
    var = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx", sink="sinks[h]")
    q, k, v = _qkv(B=B, Skv=Skv)
    slope, sinks = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    compiled = torch.compile(lambda q, k, v, slope, sinks: var(q, k, v, backend="eager", return_lse=True,
                                                               slope=slope, sinks=sinks),
                             fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, slope, sinks)
    ref_out, ref_lse = var(q, k, v, backend="eager", return_lse=True, slope=slope, sinks=sinks)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v, slope):
        assert t.grad.shape == t.shape and not t.grad.any()
    torch.testing.assert_close(sinks.grad, torch.full((4,), float(B * 19)))
