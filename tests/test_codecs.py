"""Codecs: every decoded entry within the documented worst-case error of a float64 truth."""

import numpy as np
import pytest
import torch

from engine.archive import codecs
from engine.runtime.encode import encode, to_numpy
from kernels import reference as R

RNG = np.random.default_rng(7)


def rows(v=4096):
    x = RNG.standard_normal((6, v)) * 4
    x[1] *= 20  # large magnitudes (|x| up to ~300)
    x[2] = 0.0  # all equal
    x[3] = -1e4
    x[3, 5] = 30.0  # one-hot-like
    x[4, ::3] = -np.inf  # masked tokens
    return x


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_float_codecs_within_bound(codec):
    x = rows()
    data, _, _ = encode(codec, torch.from_numpy(x).float())
    y = codecs.decode(codec, to_numpy(codec, data)).astype(np.float64)
    x32 = x.astype(np.float32).astype(np.float64)  # the model's own output precision
    fin = np.isfinite(x32)
    assert np.array_equal(np.isneginf(y), np.isneginf(x32)), "-inf must survive"
    err = np.abs(y[fin] - x32[fin])
    bound = np.abs(x32[fin]) * {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}[codec]
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"
    # the bound is not vacuous: fp16/bf16 do lose precision on these rows
    if codec != "fp32":
        assert err.max() > 0


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([[1e6, -1e6, 0.0, -np.inf]])
    data, _, _ = encode("fp16", x)
    y = codecs.decode("fp16", to_numpy("fp16", data))
    assert y.tolist()[0][:3] == [65504.0, -65504.0, 0.0] and np.isneginf(y[0, 3])


@pytest.mark.parametrize("window", [24.0, 30.0])
def test_q16_logprob_error_within_half_step(window):
    x = rows(49152)
    data, scale, offset = encode("q16", torch.from_numpy(x).float(), window)
    y = codecs.decode("q16", to_numpy("q16", data), scale.numpy(), offset.numpy())
    lp = R.log_softmax(x.astype(np.float32).astype(np.float64))
    lo = offset.numpy().astype(np.float64)[:, None]
    inside = lp >= lo
    err = np.abs(y - lp)[inside]
    assert err.max() <= codecs.worst_case_error("q16", 0, window), err.max()
    # entries below the window decode to the floor (clamped, llama.cpp style)
    below = ~inside
    assert below.any()
    assert np.allclose(y[below], np.broadcast_to(lo, y.shape)[below], atol=1e-5)
    assert np.all(np.max(lp, -1) - lo[:, 0] <= window + 1e-4)
    # all-equal row: zero range, decodes exactly to log(1/V)
    assert np.allclose(y[2], -np.log(49152), atol=1e-5)


def test_q16_window_must_be_at_least_24():
    with pytest.raises(ValueError, match="q16_window"):
        codecs.check_codec("q16", 16.0)
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.check_codec("int8")
