"""Pass 3, assign: the DPC rule, its bounds, pinning, the uniform policy and its errors."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from helpers import assigned as assign  # the policy's bits, written by the assign pass
from helpers import check_pass, examples
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import SpecMLP, bit_bounds, capacity_lists, configs, deltas, mlps
from torch import Tensor, nn

import dpc_fx
from dpc_fx import Bits, ConfigError, DPCConfig, PassOrderError
from dpc_fx.meta import graph_info
from dpc_fx.passes import capacity, trace
from dpc_fx.policy import dpc_bits


def measured(model: nn.Module, *inputs: Tensor):
    return capacity(trace(model), inputs if inputs else None)


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# ------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("capacities", "kwargs", "expected"),
    [
        ([100, 1_000, 10_000], {}, [8, 6, 4]),  # the docstring's values
        ([100, 1_000, 10_000], {"delta": 0.5}, [7, 6, 5]),
        ([5, 5, 5], {}, [6, 6, 6]),
        ([5, 5], {"b_min": 4, "b_max": 7}, [6, 6]),  # mid-point 5.5 rounds up
        ([0, 100, 1_000, 10_000], {}, [8, 8, 6, 4]),  # capacity 0: b_max, not in the stats
        ([0, 0], {}, [8, 8]),
        ([1_000], {}, [6]),
        ([1, 1, 1, 97], {}, [6, 6, 6, 4]),  # median 1: b = 97
        ([1, 1, 1, 97], {"centre": "mean"}, [8, 8, 8, 6]),  # mean 25: b = 25
        ([10, 20, 40, 80, 160], {"b_min": 2, "b_max": 8}, [8, 7, 5, 4, 2]),
    ],
)
def test_dpc_bits_hand_computed(capacities: list[float], kwargs: dict, expected: list[int]) -> None:
    kwargs = {"b_min": 4, "b_max": 8} | kwargs
    assert dpc_bits(capacities, **kwargs) == expected


@examples(200)
@given(capacity_lists, bit_bounds(), deltas, st.sampled_from(["median", "mean"]))
@example([1.0, 2.0, 4.0], (4, 8), 1.0, "median")
@example([3.0, 3.0, 3.0 + 1e-12], (1, 16), 1.0, "mean")
def test_larger_capacity_never_gets_more_bits(
    caps: list[float], bounds: tuple[int, int], delta: float, centre: str
) -> None:
    b_min, b_max = bounds
    out = dpc_bits(caps, b_min=b_min, b_max=b_max, delta=delta, centre=centre)
    assert len(out) == len(caps)
    assert all(b_min <= b <= b_max and isinstance(b, int) for b in out)
    for c1, b1 in zip(caps, out, strict=True):
        for c2, b2 in zip(caps, out, strict=True):
            if c1 > c2:
                assert b1 <= b2, (c1, b1, c2, b2)
            if c1 == c2:
                assert b1 == b2


@examples(100)
@given(capacity_lists, bit_bounds())
def test_with_delta_1_the_more_extreme_end_reaches_its_bound(
    caps: list[float], bounds: tuple[int, int]
) -> None:
    b_min, b_max = bounds
    out = dpc_bits(caps, b_min=b_min, b_max=b_max)
    assume(max(caps) > min(caps))
    mid = statistics.median(caps)
    if max(caps) / mid >= mid / min(caps):
        assert out[caps.index(max(caps))] == b_min
    if mid / min(caps) >= max(caps) / mid:
        assert out[caps.index(min(caps))] == b_max


@examples(50)
@given(
    st.integers(1, 10**12).map(float),  # capacities are parameter or MAC counts
    st.integers(1, 12),
    bit_bounds(),
    deltas,
    st.sampled_from(["median", "mean"]),
)
def test_equal_capacities_get_the_midpoint(
    c: float, n: int, bounds: tuple[int, int], delta: float, centre: str
) -> None:
    b_min, b_max = bounds
    out = dpc_bits([c] * n, b_min=b_min, b_max=b_max, delta=delta, centre=centre)
    assert out == [math.ceil((b_min + b_max) / 2)] * n


@examples(100)
@given(
    capacity_lists, bit_bounds(), deltas, st.sampled_from(["median", "mean"]), st.integers(-20, 20)
)
def test_bits_depend_on_capacity_ratios_only(
    caps: list[float], bounds: tuple[int, int], delta: float, centre: str, power: int
) -> None:
    b_min, b_max = bounds
    scaled = [c * 2.0**power for c in caps]  # exact in floating point
    kw = {"b_min": b_min, "b_max": b_max, "delta": delta, "centre": centre}
    assert dpc_bits(scaled, **kw) == dpc_bits(caps, **kw)


@examples(100)
@given(capacity_lists, bit_bounds(), st.sampled_from(["median", "mean"]))
def test_smaller_delta_never_spreads_wider(
    caps: list[float], bounds: tuple[int, int], centre: str
) -> None:
    b_min, b_max = bounds
    full = dpc_bits(caps, b_min=b_min, b_max=b_max, delta=1.0, centre=centre)
    half = dpc_bits(caps, b_min=b_min, b_max=b_max, delta=0.5, centre=centre)
    assert max(half) - min(half) <= max(full) - min(full)


@pytest.mark.parametrize("c", [0.1, 0.7, 3.3])
def test_equal_float_capacities_get_the_midpoint_with_mean_centre(c: float) -> None:
    assert dpc_bits([c] * 3, b_min=4, b_max=8, centre="mean") == [6, 6, 6]


# -------------------------------------------------------------------------- on graphs


def bits_of(gm) -> dict[str, Bits | None]:
    return {m.layer: m.bits for m in dpc_fx.layers(gm)}


def test_first_and_last_layer_with_parameters_are_pinned() -> None:
    gm = check_pass(assign, measured(mlp(4, 8, 16, 8, 2)))
    metas = dpc_fx.layers(gm)
    assert [m.layer for m in metas] == ["0", "2", "4", "6"]
    assert [m.pinned for m in metas] == [True, False, False, True]
    assert metas[0].bits == metas[3].bits == Bits(None, None, None)
    # The two free layers: 8*16+16 = 144 and 16*8+8 = 136 parameters.
    assert [m.capacity for m in metas] == [40.0, 144.0, 136.0, 18.0]
    # median 140, b = 140/136: 136 gets b_max; 144 gets ceil(6 - 2 * log_b(144/140)) = 5.
    assert [m.bits for m in metas[1:3]] == [Bits(5, 5, 8), Bits(8, 8, 8)]


def test_pin_first_last_false_quantises_every_layer() -> None:
    gm = assign(measured(mlp(4, 8, 16, 8, 2)), DPCConfig(pin_first_last=False))
    metas = dpc_fx.layers(gm)
    assert not any(m.pinned for m in metas)
    assert all(m.bits is not None and m.bits.w is not None for m in metas)
    # 40, 144, 136, 18 params: median 88, b = max(144/88, 88/18) = 88/18
    assert [m.bits for m in metas] == [
        Bits(b, b, 8) for b in dpc_bits([40, 144, 136, 18], b_min=4, b_max=8)
    ]


class AttentionTail(nn.Module):
    """The last matmul-like node multiplies two activations: it has no parameters, so the
    last layer *with parameters* is pinned instead."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.mid = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(torch.relu(self.q(x)))
        return h @ self.k(x).t()


def test_pinning_skips_layers_without_parameters() -> None:
    metas = {m.layer: m for m in dpc_fx.layers(assign(measured(AttentionTail())))}
    assert set(metas) == {"q", "mid", "k", "matmul"}
    assert {k for k, m in metas.items() if m.pinned} == {"q", "k"}
    assert metas["matmul"].params == 0 and metas["matmul"].bits == Bits(8, 8, 8)
    assert metas["mid"].bits == Bits(6, 6, 8)


def test_uniform_policy_gives_every_free_layer_b_max() -> None:
    config = DPCConfig(policy="uniform", b_min=2, b_max=5, grad_bits=6)
    metas = dpc_fx.layers(assign(measured(mlp(4, 8, 16, 8, 8, 2)), config))
    assert [m.bits for m in metas] == [Bits(None, None, None)] + [Bits(5, 5, 6)] * 3 + [
        Bits(None, None, None)
    ]


def test_grad_bits_none_leaves_gradients_full_precision() -> None:
    metas = dpc_fx.layers(assign(measured(mlp(4, 8, 8, 2)), DPCConfig(grad_bits=None)))
    assert metas[1].bits == Bits(6, 6, None)


def test_capacity_macs_ranks_by_multiply_accumulates() -> None:
    x = torch.randn(2, 4)
    gm = assign(measured(mlp(4, 8, 16, 8, 2), x), DPCConfig(capacity="macs", pin_first_last=False))
    metas = dpc_fx.layers(gm)
    assert [m.capacity for m in metas] == [
        float(2 * a * b) for a, b in [(4, 8), (8, 16), (16, 8), (8, 2)]
    ]


def test_capacity_macs_without_inputs_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"DPCConfig: capacity='macs' needs the layers' MACs, but layer '0' was measured "
        r"without example inputs; pass example_inputs to dpc_fx\.compile or use capacity='params'\.",
    ):
        assign(measured(mlp(4, 8, 8, 2)), DPCConfig(capacity="macs"))


def test_assign_leaves_the_graph_alone() -> None:
    gm = measured(mlp(4, 8, 8, 2), torch.randn(2, 4))
    out = check_pass(assign, gm, inputs=(torch.randn(3, 4),))
    assert [(n.op, n.target) for n in out.graph.nodes] == [(n.op, n.target) for n in gm.graph.nodes]
    assert all(m.bits is None for m in dpc_fx.layers(gm)), "the input's records are untouched"
    assert graph_info(out).config == DPCConfig()


@examples(60)
@given(model_x=mlps(min_depth=2), config=configs())
def test_assign_on_random_models_respects_bounds_pins_and_order(model_x, config: DPCConfig) -> None:
    model, _ = model_x
    gm = check_pass(assign, measured(model), config)
    metas = dpc_fx.layers(gm)
    weighted = [m for m in metas if m.params > 0]
    if config.pin_first_last and weighted:
        assert {m.layer for m in metas if m.pinned} == {weighted[0].layer, weighted[-1].layer}
    else:
        assert not any(m.pinned for m in metas)
    free = [m for m in metas if not m.pinned]
    for m in metas:
        assert m.capacity == float(m.params)
        if m.pinned:
            assert m.bits == Bits(None, None, None)
        else:
            assert m.bits is not None and m.bits.w == m.bits.a and m.bits.g == config.grad_bits
            assert config.b_min <= m.bits.w <= config.b_max
            if config.policy == "uniform":
                assert m.bits.w == config.b_max
    if config.policy == "dpc":
        for m1 in free:
            for m2 in free:
                if m1.capacity > m2.capacity:
                    assert m1.bits.w <= m2.bits.w


def test_assign_on_an_unmeasured_graph_raises_pass_order_error() -> None:
    with pytest.raises(
        PassOrderError,
        match=r"assign: node '_0' .*no meta\['dpc'\]; run dpc_fx\.passes\.capacity on the graph first\.",
    ):
        assign(trace(mlp(4, 8, 8, 2)))


def test_assign_reports_a_layer_whose_record_is_not_a_layer_meta() -> None:
    gm = measured(mlp(4, 8, 2))
    next(n for n in gm.graph.nodes if n.op == "call_module").meta["dpc"] = {"params": 3}
    with pytest.raises(
        PassOrderError,
        match=r"assign: node '_0' .*no meta\['dpc'\]; run dpc_fx\.passes\.capacity on the graph first\.",
    ):
        assign(gm)


def test_assign_is_deterministic() -> None:
    gm = measured(SpecMLP(next_spec()), torch.randn(2, 4))
    assert dpc_fx.layers(assign(gm)) == dpc_fx.layers(assign(gm))


def next_spec():
    from strategies import Dense, MLPSpec

    return MLPSpec(4, tuple(Dense("linear", 4, 4, "relu", True, True) for _ in range(4)))
