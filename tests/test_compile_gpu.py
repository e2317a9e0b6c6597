"""attnlang inside torch.compile on a GPU (fa4 and flex): fullgraph compile with 0 graph breaks, compiled forward
and gradients equal to the uncompiled call, and a decode step (q_len 1, bottom-right causal, a KV cache in a
static buffer) captured in a CUDA graph (torch.cuda.graph and torch.compile(mode="reduce-overhead")) that replays
correctly. Capturing proves the step has no host sync: a sync inside a capture is an error."""

from __future__ import annotations

import pytest
import torch

import attnlang as al
from attnlang import op

pytestmark = pytest.mark.gpu

CAUSAL = al.compile(mask="q_idx >= kv_idx")
ALIBI = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
DECODE = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")


def _fa4_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = [pytest.param("fa4", marks=pytest.mark.skipif(not _fa4_available(), reason="needs flash-attn-4, sm90+")),
            "flex"]


def _qkv(B=2, Hq=8, Hkv=2, S=256, D=128, grad=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for h in (Hq, Hkv, Hkv)]


class Attention(torch.nn.Module):
    def __init__(self, variant, backend, learned):
        super().__init__()
        self.variant, self.backend = variant, backend
        slope = torch.exp2(-8 * torch.arange(1, 9, device="cuda") / 8)
        self.slope = torch.nn.Parameter(slope, requires_grad=learned)

    def forward(self, q, k, v):
        tensors = {"slope": self.slope} if self.variant is ALIBI else {}
        return self.variant(q, k, v, backend=self.backend, **tensors)


def _step(module, q, k, v):
    out = module(q, k, v)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    if module.slope.requires_grad and module.variant is ALIBI:
        grads.append(module.slope.grad.clone())
        module.slope.grad = None
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["causal", "alibi", "alibi_learned"])
def test_fullgraph_compile_matches_the_uncompiled_call(backend, variant):
    if backend == "fa4" and variant == "alibi_learned":
        pytest.skip("fa4 computes no gradients to named tensors (auto runs those on flex)")
    module = Attention(CAUSAL if variant == "causal" else ALIBI, backend, variant == "alibi_learned")
    q, k, v = _qkv()
    explained = torch._dynamo.explain(module)(q, k, v)
    assert explained.graph_break_count == 0
    ref = _step(module, q, k, v)
    torch._dynamo.reset()
    got = _step(torch.compile(module, fullgraph=True), q, k, v)
    torch.testing.assert_close(got[0], ref[0])  # the same kernel on the same inputs
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert op.GRAPHS.take(got[0]) is None  # the backward used (and dropped) what the forward kept


class DecodeStep(torch.nn.Module):
    """One decoding step over a static KV cache: write the new key / value at ``pos`` (an int64 [1] device tensor)
    into the buffers, attend with q_len 1 over the whole buffer (bottom-right causal: every key)."""

    def __init__(self, B=4, Hq=8, Hkv=2, L=1024, D=128, backend="auto"):
        super().__init__()
        g = torch.Generator(device="cuda").manual_seed(1)
        self.register_buffer("k_cache", torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g))
        self.register_buffer("v_cache", torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g))
        self.backend = backend

    def forward(self, q, k_new, v_new, pos):
        self.k_cache.index_copy_(2, pos, k_new)
        self.v_cache.index_copy_(2, pos, v_new)
        return DECODE(q, self.k_cache, self.v_cache, backend=self.backend)


def _decode_inputs(step, seed, B=4, Hq=8, Hkv=2, D=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k_new = torch.randn(B, Hkv, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v_new = torch.randn(B, Hkv, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.tensor([seed % step.k_cache.shape[2]], device="cuda")
    return q, k_new, v_new, pos


def _reference(step, q, k_new, v_new, pos):
    k, v = step.k_cache.clone(), step.v_cache.clone()
    k.index_copy_(2, pos, k_new)
    v.index_copy_(2, pos, v_new)
    return DECODE(q, k, v, backend="eager")


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_decode_step_in_a_cuda_graph_replays_correctly(backend):
    step = DecodeStep(backend=backend)
    static = _decode_inputs(step, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: kernels compiled, caches filled (as torch.cuda.graph's docs ask)
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    for seed in (5, 6, 7):
        new = _decode_inputs(step, seed)
        expected = _reference(step, *new)
        for buf, value in zip(static, new):
            buf.copy_(value)
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


LENGTH = al.compile(mask="kv_idx <= n[0]")


@pytest.mark.skipif(not _fa4_available(), reason="needs flash-attn-4, sm90+")
@torch.no_grad()
def test_decode_with_a_length_tensor_in_a_cuda_graph():
    """A static buffer filled up to n[0] (an int64 [1] device tensor written in place every step): the length's
    range is declared (value_ranges), the kernel reads n from memory (bake False) without tiles derived from its
    values (dense True), so the captured step needs no sync and every replay sees the current n."""
    step = DecodeStep(backend="fa4")
    L = step.k_cache.shape[2]
    options = {"value_ranges": {"n": (0, L - 1)}, "bake": False, "dense": True}

    def attend(q, k_new, v_new, pos):
        step.k_cache.index_copy_(2, pos, k_new)
        step.v_cache.index_copy_(2, pos, v_new)
        return LENGTH(q, step.k_cache, step.v_cache, n=pos, backend="fa4", kernel_options=options)

    static = _decode_inputs(step, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            attend(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(*static)
    for seed in (10, 200, 701):
        new = _decode_inputs(step, seed)
        k, v = step.k_cache.clone(), step.v_cache.clone()
        k.index_copy_(2, new[3], new[1])
        v.index_copy_(2, new[3], new[2])
        expected = LENGTH(new[0], k, v, n=new[3].clone(), backend="eager")
        for buf, value in zip(static, new):
            buf.copy_(value)
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_decode_step_compiled_with_reduce_overhead(backend):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    step = DecodeStep(backend=backend)
    # flex builds its BlockMask from host tables, which a CUDA graph cannot capture: one eager call builds it
    # ahead (kept outside the graph's pool; the graph's warm-up and capture only read it)
    warm = _decode_inputs(step, 99)[0]
    DECODE(warm, step.k_cache, step.v_cache, backend=backend)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for seed in range(6):
        inputs = _decode_inputs(step, seed)
        expected = _reference(step, *inputs)
        got = compiled(*inputs).clone()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)) == 0, dict(counters["inductor"])


transformers = pytest.importorskip("transformers")


@torch.no_grad()
def test_transformers_llama_compiled_on_the_gpu():
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import attnlang.integrations.transformers as alt
    alt.register()
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, attn_implementation="attnlang")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 200), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    caches = DynamicCache(config=config), DynamicCache(config=config)
    ref = model(ids, past_key_values=caches[0], use_cache=True).logits
    got = compiled(ids, past_key_values=caches[1], use_cache=True).logits
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    token = ref[:, -1:].argmax(-1)
    for _ in range(3):
        ref = model(token, past_key_values=caches[0], use_cache=True).logits
        got = compiled(token, past_key_values=caches[1], use_cache=True).logits
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
        token = ref[:, -1:].argmax(-1)
