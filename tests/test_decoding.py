"""DecodeConfig: defaults, the checks of validate() (one line naming the field), the JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stepscope.decoding import DecodeConfig, DecodeConfigError
from stepscope.errors import StepscopeError


def test_defaults_are_the_generation_defaults():
    d = DecodeConfig()
    assert (d.max_new_tokens, d.max_thinking_tokens, d.temperature, d.top_p, d.top_k, d.do_sample, d.seed) == \
        (1024, None, 0.6, 0.95, 0, None, 0)
    assert d.sampling


@pytest.mark.parametrize("kwargs, want", [
    (dict(temperature=0.0), False), (dict(temperature=0.7), True), (dict(temperature=0.7, do_sample=False), False),
    (dict(temperature=1.0, do_sample=True), True),
])
def test_sampling_follows_do_sample_then_temperature(kwargs, want):
    assert DecodeConfig(**kwargs).sampling is want


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_thinking_tokens=-1), "max_thinking_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(do_sample=True, temperature=0), "do_sample"),
    (dict(seed=1.5), "seed"),
])
def test_bad_values_name_their_field(kwargs, field):
    with pytest.raises(DecodeConfigError) as e:
        DecodeConfig(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field + " ") and "\n" not in str(e.value)
    assert isinstance(e.value, StepscopeError) and str(e.value) == f"{field} {e.value.problem}"


def test_validate_sees_a_changed_field():
    d = DecodeConfig()
    assert d.validate() is d
    d.top_p = 0.0
    with pytest.raises(DecodeConfigError, match=r"top_p must be in \(0, 1\], got 0.0"):
        d.validate()


def test_greedy_with_temperature_zero_is_explicit():
    with pytest.raises(DecodeConfigError, match="temperature > 0"):
        DecodeConfig(temperature=0, do_sample=True)
    assert not DecodeConfig(temperature=0, do_sample=False).sampling


def test_json_round_trip():
    d = DecodeConfig(max_new_tokens=7, max_thinking_tokens=3, temperature=1, top_p=0.5, top_k=40, do_sample=True,
                     seed=11)
    j = d.to_json()
    assert j == {"max_new_tokens": 7, "max_thinking_tokens": 3, "temperature": 1.0, "top_p": 0.5, "top_k": 40,
                 "do_sample": True, "seed": 11}
    assert isinstance(j["temperature"], float)
    assert DecodeConfig.from_json(j) == d
    assert DecodeConfig.from_json(json.dumps(j)) == d
    assert DecodeConfig.from_json({}) == DecodeConfig()
    j = DecodeConfig(max_new_tokens=np.int64(5), top_k=np.int32(2), seed=np.int64(3)).to_json()
    assert [type(j[k]) for k in ("max_new_tokens", "top_k", "seed")] == [int, int, int]  # JSON-able


@pytest.mark.parametrize("bad, msg", [
    ("{oops", "not valid JSON"), ("[1]", "must be an object"), ({"temp": 1}, "unknown decoding config key"),
    ({"top_k": -2}, "top_k must be >= 0"),
])
def test_from_json_errors(bad, msg):
    with pytest.raises(StepscopeError, match=msg):
        DecodeConfig.from_json(bad)
