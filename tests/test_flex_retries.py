"""flex's forms for what Inductor cannot lower and its retries with smaller tiles, on the CPU: integer powers as
products (same values as eager), literals as graph ops, and the "out of resource" ladder of kernel options."""

import pytest
import torch

import attnlang as al
from attnlang.ast import Binary, Op, walk
from attnlang.backends import flex
from attnlang.lower_torch import evaluate, positions


def _bound_score(score):
    q = torch.randn(1, 2, 16, 8)
    return al.compile(score=score)._plan(q, q, q, None, "eager", False, None, {}).score


def _pows(expr):
    return [n for n in walk(expr) if isinstance(n, Binary) and n.op is Op.POW]


@pytest.mark.parametrize("score", [
    "score - 0.01 * float((q_idx - kv_idx) ** 2)",
    "score + float((kv_idx - q_idx) ** 5) * 1e-6",
    "score - 0.01 * float(q_idx - kv_idx) ** 3",
    "score + float(abs(q_idx - kv_idx) ** 0)",
    "score - float(q_idx - kv_idx) ** 2.0 * 0.01",
    "score * 0.5 ** 3",
])
def test_integral_powers_become_products_with_the_same_values(score):
    expr = _bound_score(score)
    prepared = flex._prepare(expr, 16, 16, torch.float32)
    assert not _pows(prepared)
    names = positions(1, 2, 0, 16, 16)
    names["score"] = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    want = evaluate(expr, names, {}, torch.float64)
    got = evaluate(prepared, names, {}, torch.float64)
    torch.testing.assert_close(got.expand_as(want), want, rtol=1e-12, atol=0)


def test_other_powers_stay_powers():
    expr = _bound_score("score - float(abs(q_idx - kv_idx)) ** 0.5")
    assert len(_pows(flex._prepare(expr, 16, 16, torch.float32))) == 1


def test_full_consts_give_the_same_values():
    expr = _bound_score("score * 0.25 + float(q_idx % 3) - 1.5")
    names = positions(1, 2, 0, 16, 16)
    names["score"] = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(evaluate(expr, names, {}, full_consts=True), evaluate(expr, names, {}),
                               rtol=0, atol=0)


OOR = "No valid triton configs. OutOfResources: out of resource: shared memory, Required: 245760, " \
      "Hardware limit: 232448. Reducing block sizes or `num_stages` may help."


class FakeRun:
    def __init__(self, fail_levels, error=OOR):
        self.fail_levels, self.error, self.seen = fail_levels, error, []

    def __call__(self, kernel, tiles):
        self.seen.append(tiles)
        level = -1 if tiles is None else [t["BLOCK_M1"] for t in flex.SMALLER_TILES].index(tiles["BLOCK_M1"])
        if level in self.fail_levels:
            raise RuntimeError(self.error)
        return "out", "lse"


@pytest.fixture(autouse=True)
def _clean():
    flex._tile_level.clear()
    yield
    flex._tile_level.clear()


def test_out_of_shared_memory_retries_with_smaller_tiles_and_remembers():
    run = FakeRun({-1})
    assert flex._run_with_smaller_tiles(run, "TRITON", "key", 300) == ("out", "lse", "TRITON")
    assert run.seen == [None, flex.SMALLER_TILES[0]]
    run2 = FakeRun(set())
    flex._run_with_smaller_tiles(run2, "TRITON", "key", 300)
    assert run2.seen == [flex.SMALLER_TILES[0]]  # straight to the tiles that worked


def test_ladder_goes_down_to_the_smallest_then_gives_up():
    run = FakeRun({-1, 0})
    flex._run_with_smaller_tiles(run, "TRITON", "key", 300)
    assert run.seen[-1] == flex.SMALLER_TILES[1]
    with pytest.raises(RuntimeError, match="out of resource"):
        flex._run_with_smaller_tiles(FakeRun({-1, 0, 1}), "TRITON", "other", 300)


def test_short_queries_keep_the_decoding_kernels_forward_tiles():
    run = FakeRun({-1})
    flex._run_with_smaller_tiles(run, "TRITON", "key", 7)
    assert "BLOCK_M" not in run.seen[1] and "BLOCK_N" not in run.seen[1] and run.seen[1]["BLOCK_M1"] == 32


def test_other_errors_and_flash_are_not_retried():
    run = FakeRun({-1}, error="some other lowering error")
    with pytest.raises(RuntimeError, match="other lowering"):
        flex._run_with_smaller_tiles(run, "TRITON", "key", 300)
    assert len(run.seen) == 1
    run = FakeRun({-1})
    with pytest.raises(RuntimeError):
        flex._run_with_smaller_tiles(run, "FLASH", "key", 300)
    assert len(run.seen) == 1


def test_out_of_resource_is_found_through_the_cause_chain():
    try:
        try:
            raise RuntimeError(OOR)
        except RuntimeError as inner:
            raise ValueError("BackendCompilerFailed: backend='inductor' raised") from inner
    except ValueError as e:
        assert flex._out_of_resource(e)
    assert not flex._out_of_resource(RuntimeError("Buffers cannot be created"))


def test_smaller_tiles_are_valid_flex_tiles():
    for tiles in flex.SMALLER_TILES:
        assert tiles["BLOCK_N1"] % tiles["BLOCK_M1"] == 0 and tiles["BLOCK_M2"] % tiles["BLOCK_N2"] == 0
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
            assert flex.BLOCK_SIZE[0] % tiles[name] == 0 and tiles[name] >= 16


def test_tiles_reach_the_kernel_options_unless_the_user_set_them(monkeypatch):
    seen = {}

    def fake_body(plan, names, fd, kernel_options, *args, **kwargs):
        seen.update(kernel_options or {})
        return lambda *a: None

    monkeypatch.setattr(flex, "_make_body", fake_body)
    q = torch.randn(1, 2, 16, 8)
    v = al.compile(mask="q_idx >= kv_idx")
    plan = v._plan(q, q, q, None, "flex", False, {"num_warps": 8}, {})
    bm = flex._block_mask(q, plan, (), torch.float32)
    flex._callable(q, q, q, plan, (), (), torch.float32, "TRITON", False, True, bm, dict(flex.SMALLER_TILES[0]))
    assert seen["num_warps"] == 8 and seen["BLOCK_M1"] == 32 and seen["BACKEND"] == "TRITON"
