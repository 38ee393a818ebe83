"""DPCConfig: defaults, validation (every message), immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import examples
from hypothesis import assume, given
from strategies import bit_bounds, bits, configs, deltas

import dpc_fx
from dpc_fx import ConfigError, DPCConfig, DPCError


def test_defaults_match_design() -> None:
    c = DPCConfig()
    assert (c.policy, c.b_min, c.b_max, c.grad_bits) == ("dpc", 4, 8, 8)
    assert (c.delta, c.capacity, c.centre, c.pin_first_last) == (1.0, "params", "median", True)


def test_config_errors_are_value_errors_and_dpc_errors() -> None:
    with pytest.raises(ValueError):
        DPCConfig(b_min=0)
    assert issubclass(ConfigError, DPCError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"b_min": 9, "b_max": 8},
            r"b_min=9 is greater than b_max=8; lower b_min or raise b_max\.",
        ),
        ({"b_min": 0}, r"DPCConfig: b_min=0 is not a bit-width; use an int from 1 to 32\."),
        ({"b_max": 33}, r"DPCConfig: b_max=33 is not a bit-width; use an int from 1 to 32\."),
        ({"b_min": 4.0}, r"b_min=4\.0 is not a bit-width"),
        ({"b_max": True}, r"b_max=True is not a bit-width"),
        ({"grad_bits": 0}, r"grad_bits=0 is not a bit-width; use an int from 1 to 32 \(or None"),
        ({"grad_bits": 33}, r"grad_bits=33 is not a bit-width"),
        ({"delta": 0}, r"DPCConfig: delta=0 is outside \(0, 1\]; try delta=1\.0\."),
        ({"delta": 0.0}, r"delta=0\.0 is outside \(0, 1\]"),
        ({"delta": -0.5}, r"delta=-0\.5 is outside \(0, 1\]"),
        ({"delta": 1.5}, r"delta=1\.5 is outside \(0, 1\]"),
        ({"delta": float("nan")}, r"delta=nan is outside \(0, 1\]"),
        ({"delta": True}, r"DPCConfig: delta=True is outside \(0, 1\]; try delta=1\.0\."),
        ({"delta": "1"}, r"DPCConfig: delta='1' is outside \(0, 1\]"),
        (
            {"similarity": 1.0},
            r"DPCConfig: similarity=1\.0 is outside \(0, 1\); try similarity=0\.95\.",
        ),
        ({"budget": 0}, r"DPCConfig: budget=0 is outside \(0, 1\); e\.g\. budget=0\.3 for 30%"),
        ({"b_min": "low"}, r"DPCConfig: b_min='low' is not a bit-width"),
        (
            {"overrides": [("fc",)]},
            r"overrides entry \('fc',\) is not \(pattern, bits\); write overrides=",
        ),
        ({"overrides": {"fc": 0}}, r"DPCConfig: overrides\['fc'\]=0 is not a bit-width"),
        (
            {"overrides": {"fc": (4, 4)}},
            r"overrides\['fc'\]=\(4, 4\) must be one int, None, or \(w, a, g\)\.",
        ),
        ({"leaf_modules": "block"}, r"leaf_modules='block' must be a tuple of module paths"),
        ({"capacity": "flops"}, r"DPCConfig: capacity='flops' is not one of 'params', 'macs'\."),
        ({"policy": "cpt"}, r"DPCConfig: policy='cpt' is not one of 'dpc', 'uniform'\."),
        ({"centre": "center"}, r"DPCConfig: centre='center' is not one of 'median', 'mean'\."),
        ({"pin_first_last": 1}, r"DPCConfig: pin_first_last=1 must be True or False\."),
    ],
)
def test_invalid_field_names_field_and_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPCConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("b", [1, 8, 16, 32])
def test_bit_widths_from_1_to_32_are_accepted(b: int) -> None:
    assert DPCConfig(b_min=b, b_max=b, grad_bits=b).b_max == b


def test_grad_bits_none_means_full_precision_gradients() -> None:
    assert DPCConfig(grad_bits=None).grad_bits is None


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        DPCConfig("dpc", 4, 8)  # type: ignore[misc]
    c = DPCConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.b_min = 2  # type: ignore[misc]


def test_replace_validates_and_leaves_the_original_alone() -> None:
    c = DPCConfig(b_min=3)
    assert c.replace(b_max=6) == DPCConfig(b_min=3, b_max=6)
    assert c.b_max == 8
    with pytest.raises(ConfigError, match=r"b_min=3 is greater than b_max=2"):
        c.replace(b_max=2)


def test_to_dict_round_trips_through_json() -> None:
    c = DPCConfig(
        b_min=3,
        b_max=7,
        grad_bits=None,
        delta=0.5,
        centre="mean",
        overrides={"fc": None, "layer1.*": (4, 5, 6)},
        leaf_modules=("block",),
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert d["b_min"] == 3 and d["grad_bits"] is None
    assert DPCConfig.from_dict(d) == c


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(
        ConfigError, match=r"DPCConfig: unknown field\(s\) \['bmin'\]; known fields are"
    ):
        DPCConfig.from_dict({"bmin": 3})


def test_overrides_are_normalised_to_a_tuple_of_pairs() -> None:
    c = DPCConfig(overrides={"fc": None, "*.downsample.*": 8, "conv1": [4, 4, None]})
    assert c.overrides == (("fc", None), ("*.downsample.*", 8), ("conv1", (4, 4, None)))
    hash(c)  # frozen and hashable: usable as a cache key


def test_b_min_auto_skips_the_order_check() -> None:
    assert DPCConfig(b_min="auto", b_max=3).b_min == "auto"


@examples(60)
@given(bounds=bit_bounds(hi=32), delta=deltas, grad=bits(hi=32))
def test_every_valid_combination_is_accepted(
    bounds: tuple[int, int], delta: float, grad: int
) -> None:
    b_min, b_max = bounds
    c = DPCConfig(b_min=b_min, b_max=b_max, delta=delta, grad_bits=grad)
    assert (c.b_min, c.b_max, c.delta, c.grad_bits) == (b_min, b_max, delta, grad)


@examples(30)
@given(configs())
def test_every_config_round_trips_through_json(config: DPCConfig) -> None:
    assert DPCConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@examples(30)
@given(bounds=bit_bounds(hi=32))
def test_b_min_above_b_max_is_rejected_naming_both(bounds: tuple[int, int]) -> None:
    low, high = bounds
    assume(low < high)
    with pytest.raises(
        ConfigError,
        match=rf"DPCConfig: b_min={high} is greater than b_max={low}; lower b_min or raise b_max\.",
    ):
        DPCConfig(b_min=high, b_max=low)


def test_compile_rejects_a_config_of_the_wrong_type() -> None:
    from torch import nn

    with pytest.raises(ConfigError, match=r"config must be a DPCConfig, got dict; build one with"):
        dpc_fx.compile(nn.Linear(2, 2), config={"b_min": 4})  # type: ignore[arg-type]
