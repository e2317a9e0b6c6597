"""attn_implementation="attnlang" in small config-built transformers models (random weights, no downloads): logits
and greedy generation equal the model's own attention; variants the model cannot express match a dense reference;
what cannot be mapped is an AttnLangError."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import attnlang as al  # noqa: E402
import attnlang.integrations.transformers as alt  # noqa: E402

alt.register()

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2_sliding": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True, sliding_window=5,
                                                          max_window_layers=1)),
    "gemma2_softcap_sliding": (Gemma2ForCausalLM, Gemma2Config, dict(sliding_window=5, attn_logit_softcapping=50.0,
                                                                     query_pre_attn_scalar=16)),
}

GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _build(name: str, impl: str, attnlang=None, **extra):
    cls, config_cls, kw = MODELS[name]
    config = config_cls(**SMALL, **kw, **extra, attn_implementation=impl)
    if attnlang is not None:
        config.attnlang = attnlang
    torch.manual_seed(0)  # same weights for every implementation
    return cls(config).eval()


def _ids(batch=2, length=23, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("native", ["eager", "sdpa"])
def test_logits_match_native(name, native):
    if name.startswith("gemma2") and native == "sdpa":
        pytest.skip("transformers' sdpa has no softcap")
    ids = _ids()
    with torch.no_grad():
        got = _build(name, "attnlang")(ids).logits
        want = _build(name, native)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_and_greedy_generation(name):
    ids = _ids(length=19)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: the first row is 13 real tokens
    ours, ref = _build(name, "attnlang"), _build(name, "eager")
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
        # greedy decoding with a KV cache: q_len 1 against a growing cache (sliding layers drop old keys)
        gen = ours.generate(ids, attention_mask=mask, **GREEDY)
        gen_ref = ref.generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    torch.testing.assert_close(torch.stack(gen.logits), torch.stack(gen_ref.logits), rtol=1e-4, atol=1e-5)


def test_model_flags_become_the_variant():
    v = alt._composed(None, True, 5, 50.0, False, True)
    assert v.score == "attnlang_softcap * tanh(score / attnlang_softcap)"
    assert v.mask == "kv_idx <= q_idx + kv_len - q_len & q_idx + kv_len - q_len - kv_idx < attnlang_window & " \
                     "attnlang_pad[b, kv_idx]"
    assert v.params == {"attnlang_softcap": 50.0, "attnlang_window": 5}
    # the config's variant is written in absolute positions: with a cache offset its positions are shifted
    user = al.compile(mask="kv_idx < prefix", params={"prefix": 3})
    shifted = alt._composed(user, True, None, None, True, True)
    assert "kv_idx + attnlang_offset[0] < prefix" in shifted.mask and "attnlang_offset" in shifted.tensor_names


# ----- variants the model cannot express natively, against dense references written here -----

def _dense_forward(bias_fn):
    """A plain attention function (registered in AttentionInterface only): causal softmax with an additive bias."""
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
        s = query.double() @ k.transpose(-1, -2) * scaling
        Sq, Skv = s.shape[-2:]
        i = torch.arange(Sq).view(-1, 1) + Skv - Sq
        j = torch.arange(Skv).view(1, -1)
        s = s + bias_fn(s.shape[1], i, j)
        s = s.masked_fill(~(j <= i), -math.inf)
        out = torch.softmax(s, -1).nan_to_num(0.0) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return forward


def _slopes(H):
    return torch.tensor([2.0 ** (-8.0 * (x + 1) / H) for x in range(H)])


def test_alibi_runs_and_matches_a_dense_reference():
    H = SMALL["num_attention_heads"]
    config = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx").to_config()
    ours = _build("llama", "attnlang", attnlang=config)
    alt.bind_tensors(ours, slope=_slopes(H))
    AttentionInterface.register("dense_alibi_test",
                                _dense_forward(lambda Hq, i, j: _slopes(Hq).double().view(-1, 1, 1) * (j - i)))
    ref = _build("llama", "dense_alibi_test")
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
        plain = _build("llama", "eager")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the bias really changed the model
    with torch.no_grad():  # decoding through the cache keeps ALiBi's absolute distances
        gen = ours.generate(ids, **GREEDY)
        gen_ref = ref.generate(ids, **GREEDY)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    torch.testing.assert_close(torch.stack(gen.logits), torch.stack(gen_ref.logits), rtol=1e-4, atol=1e-5)


def test_document_mask_over_packed_sequences():
    a, b = _ids(1, 9, seed=2), _ids(1, 14, seed=3)
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 9 + [1] * 14)
    config = {"mask": "doc[q_idx] == doc[kv_idx]"}
    ours = _build("llama", "attnlang", attnlang=config)
    ref = _build("llama", "eager")
    with torch.no_grad():
        got = ours(packed, attnlang_tensors={"doc": doc}).logits
        alone_a, alone_b = ref(a).logits, ref(b).logits  # each document on its own (RoPE is shift-invariant)
    torch.testing.assert_close(got[:, :9], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, 9:], alone_b, rtol=1e-4, atol=1e-4)


def test_document_mask_while_decoding_with_a_sliding_cache():
    # absolute positions survive a sliding-window cache that drops old keys: generating after two packed documents
    # gives what the second document alone gives
    a, b = _ids(1, 10, seed=4), _ids(1, 2, seed=5)  # the boundary stays inside the window while decoding
    new = 6
    doc = torch.tensor([0] * 10 + [1] * (2 + new))
    ours = _build("qwen2_sliding", "attnlang", attnlang={"mask": "doc[q_idx] == doc[kv_idx]"})
    alt.bind_tensors(ours, doc=doc)
    ref = _build("qwen2_sliding", "eager")
    with torch.no_grad():
        got = ours.generate(torch.cat([a, b], 1), max_new_tokens=new, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        want = ref.generate(b, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences[:, -new:], want.sequences[:, -new:])
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)


def test_per_layer_variants_as_gemma_alternates():
    # layer 0 of this Gemma2 is sliding (window 5) natively, layer 1 global; the config adds a chunked mask to layer 1
    ids = _ids()
    with torch.no_grad():
        native = _build("gemma2_softcap_sliding", "eager")(ids).logits
        same = _build("gemma2_softcap_sliding", "attnlang", attnlang=[None, {"mask": "q_idx // 64 == kv_idx // 64"}])
        chunked = _build("gemma2_softcap_sliding", "attnlang", attnlang=[None, {"mask": "q_idx // 4 == kv_idx // 4"}])
        torch.testing.assert_close(same(ids).logits, native, rtol=1e-4, atol=1e-5)  # one chunk covers all 23
        assert (chunked(ids).logits - native).abs().max() > 1e-3  # chunks of 4 really change layer 1
    with pytest.raises(al.AttnLangError, match=r"config.attnlang\[1\]"):
        bad = _build("gemma2_softcap_sliding", "attnlang", attnlang=[None, {"mask": "q_idx >= kv_idx", "bogus": 1}])
        with torch.no_grad():
            bad(ids)


# ----- what cannot be mapped is an AttnLangError naming it -----

def test_packed_position_ids_are_not_silently_dropped():
    ids = _ids(1, 12)
    position_ids = torch.tensor([list(range(5)) + list(range(7))])
    with pytest.raises(al.AttnLangError, match="packed sequences"):
        with torch.no_grad():
            _build("llama", "attnlang")(ids, position_ids=position_ids, use_cache=False)


def test_attention_without_the_mask_function_is_an_error():
    AttentionInterface.register("attnlang_attention_only", alt.attention_forward)
    with pytest.raises(al.AttnLangError, match="padding"):
        with torch.no_grad():
            _build("llama", "attnlang_attention_only")(_ids())


def test_dropout_while_training_is_an_error():
    model = _build("llama", "attnlang", attention_dropout=0.1).train()
    with pytest.raises(al.AttnLangError, match="dropout"):
        model(_ids())


def test_static_cache_is_an_error():
    model = _build("llama", "attnlang")
    with pytest.raises(al.AttnLangError, match="static cache"):
        with torch.no_grad():
            model.generate(_ids(1, 6), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_bad_config_and_missing_tensor_name_the_key():
    with pytest.raises(al.AttnLangError, match="config.attnlang.*'scor'"):
        with torch.no_grad():
            _build("llama", "attnlang", attnlang={"scor": "score"})(_ids())
    with pytest.raises(al.AttnLangError, match="'slope'"):
        with torch.no_grad():
            _build("llama", "attnlang", attnlang={"score": "score + slope[h]"})(_ids())
    with pytest.raises(al.AttnLangError, match="per-layer"):
        with torch.no_grad():
            _build("llama", "attnlang", attnlang=[{"mask": "True"}])(_ids())
    with pytest.raises(al.AttnLangError, match="'backend'"):
        with torch.no_grad():
            _build("llama", "attnlang", attnlang_options={"backend": "cuda"})(_ids())
    with pytest.raises(al.AttnLangError, match="'compile'"):
        with torch.no_grad():
            _build("llama", "attnlang", attnlang_options={"compile": True})(_ids())


def test_the_variant_stays_plain_data_in_the_model_config():
    layers = [al.compile(mask="0 <= q_idx - kv_idx < w", params={"w": 4}).to_config(), {"mask": "True"}]
    config = LlamaConfig(**SMALL, attn_implementation="attnlang", attnlang=layers,
                         attnlang_options={"backend": "eager"})
    text = config.to_json_string()
    again = LlamaConfig.from_dict(json.loads(text))
    assert again.attnlang == layers and again.attnlang_options == {"backend": "eager"}
    assert alt.layer_variant(again, 0) == al.compile(mask="0 <= q_idx - kv_idx < w", params={"w": 4})
    # a JSON or YAML string in the config works too
    config.attnlang = "mask: q_idx // 4 == kv_idx // 4\n"
    assert alt.layer_variant(config, 1) == al.compile(mask="q_idx // 4 == kv_idx // 4")
    torch.manual_seed(0)
    with torch.no_grad():
        LlamaForCausalLM(again).eval()(_ids())


# ----- learned attention sinks (gpt-oss's s_aux) -----

def _gpt_oss(impl: str):
    from transformers import GptOssConfig, GptOssForCausalLM
    config = GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=5, max_position_embeddings=256,
                          layer_types=["sliding_attention", "full_attention"], attn_implementation=impl)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # sinks of order 1 (the default init is ~0.02), so they matter
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    return model


def test_gpt_oss_sinks_and_alternating_windows_match_eager():
    pytest.importorskip("transformers.models.gpt_oss")
    ids = _ids(batch=2, length=23)
    native, ours = _gpt_oss("eager"), _gpt_oss(alt.NAME)
    with torch.no_grad():
        want = native(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # the sinks change the result: without them the logits differ
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.self_attn.sinks.fill_(-math.inf)
        assert (ours(ids).logits - want).abs().max() > 1e-3


def test_gpt_oss_greedy_generation_and_sink_gradients():
    pytest.importorskip("transformers.models.gpt_oss")
    ids = _ids(batch=1, length=9)
    native, ours = _gpt_oss("eager"), _gpt_oss(alt.NAME)
    a = native.generate(ids, **GREEDY)
    b = ours.generate(ids, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    for model in (native, ours):
        model.zero_grad()
        model(ids).logits.square().mean().backward()
    for la, lb in zip(native.model.layers, ours.model.layers):
        ga, gb = la.self_attn.sinks.grad, lb.self_attn.sinks.grad
        assert gb is not None and gb.abs().sum() > 0
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_s_aux_of_another_shape_is_an_error():
    module = torch.nn.Module()
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(al.AttnLangError, match="s_aux"):
        alt.attention_forward(module, q, q, q, None, s_aux=torch.zeros(3))


def test_config_sink_and_normalize_reach_the_variant():
    layer = al.compile(score="log(sigmoid(score - 2.0))", sink="q_idx * 0.0 + 1.0", normalize=False)
    var = alt._composed(layer, True, None, None, False, False)
    assert var.sink is not None and var.normalize is False
    with pytest.raises(al.AttnLangError, match="s_aux"):
        alt._composed(al.compile(sink="0"), True, None, None, False, False, True)
    assert alt._composed(None, True, 5, None, False, False, True).sink == "attnlang_sink[h]"


def test_bind_tensors_with_a_tensor_no_variant_reads_is_an_error():
    config = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx").to_config()
    ours = _build("llama", "attnlang", attnlang=config)
    with pytest.raises(al.AttnLangError, match="'doc' is given to bind_tensors"):
        alt.bind_tensors(ours, slope=_slopes(SMALL["num_attention_heads"]), doc=torch.zeros(4))
    alt.bind_tensors(ours, slope=_slopes(SMALL["num_attention_heads"]))


def test_a_caret_points_at_the_users_own_expression_not_the_rewritten_one():
    mask = "doc[q_idx] == doc[kv_idx]"
    ours = _build("llama", "attnlang", attnlang={"mask": mask})
    alt.bind_tensors(ours, doc=torch.zeros(3, dtype=torch.long))   # too short for 23 positions
    with pytest.raises(al.AttnLangError) as info, torch.no_grad():
        ours(_ids())
    err = info.value
    assert err.source == mask and err.where == "config.attnlang mask"
    assert (err.line, err.column, err.length) == (1, 5, 5)           # under q_idx, the index as written
    assert "kv_len - q_len" not in str(err) and "^^^^^" in str(err)
    # a score the model rewrites twice (absolute positions, Gemma 2's softcap around `score`)
    score = "score + float(int(t[kv_idx]))"
    ours = _build("gemma2_softcap_sliding", "attnlang", attnlang={"score": score})
    alt.bind_tensors(ours, t=torch.full((23,), math.inf))
    with pytest.raises(al.AttnLangError, match="int\\(\\) of a value") as info, torch.no_grad():
        ours(_ids())
    err = info.value
    assert err.source == score and err.where == "config.attnlang score"
    assert score[err.column - 1:err.column - 1 + err.length] == "int(t[kv_idx])"


def test_config_attnlang_as_json_or_yaml_text_is_read_like_from_config():
    layers = [{"mask": "True"}, {"mask": "q_idx // 4 == kv_idx // 4", "params": {}}]
    want = [al.from_config(layer) for layer in layers]
    for text in (json.dumps(layers), "- mask: 'True'\n- mask: q_idx // 4 == kv_idx // 4\n  params: {}\n"):
        config = LlamaConfig(**SMALL, attn_implementation="attnlang", attnlang=text)
        assert [alt.layer_variant(config, i) for i in range(2)] == want
    one = json.dumps(al.compile(mask="q_idx - kv_idx < w", params={"w": 3}).to_config())
    config = LlamaConfig(**SMALL, attn_implementation="attnlang", attnlang=one)
    assert alt.layer_variant(config, 0) == al.from_config(one)
    # a model built from JSON text runs, and bind_tensors knows what the text's variants read
    ours = _build("llama", "attnlang", attnlang=json.dumps([{"mask": "True"}, {"mask": "doc[q_idx] == doc[kv_idx]"}]))
    with pytest.raises(al.AttnLangError, match="'slope' is given to bind_tensors"):
        alt.bind_tensors(ours, slope=torch.ones(4))
    alt.bind_tensors(ours, doc=torch.arange(23) // 8)
    with torch.no_grad():
        assert torch.isfinite(ours(_ids()).logits).all()
    with pytest.raises(al.AttnLangError, match="config.attnlang"):
        alt.layer_variant(LlamaConfig(**SMALL, attnlang='[{"mask": '), 0)


@pytest.mark.parametrize("call", [lambda: alt.bind_tensors(None, bias=torch.zeros(4)),
                                  lambda: alt.bind_tensors(_build("llama", "attnlang"), bias=[0.0] * 4),
                                  lambda: alt.register(3), lambda: alt.register("")],
                         ids=["model_none", "not_a_tensor", "register_int", "register_empty"])
def test_bind_tensors_and_register_refuse_wrong_types(call):
    with pytest.raises(al.AttnLangError):
        call()
