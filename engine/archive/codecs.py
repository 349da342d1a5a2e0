"""Decoding the archive's logit codecs with numpy (docs/archive-format.md, "Codecs").

Encoding runs in torch on the model's device, in the run layer (`engine.runtime.encode`); this module
needs no torch, so reading an archive never imports it.  The numba kernels decode the same
codes in-kernel and are tested against `decode`.

Codecs, per row of V logits:
  fp32  float32, exact for fp32/bf16/fp16 models.
  fp16  float16; finite values beyond +-65504 saturate, -inf (masked tokens) is kept.
        Worst-case error |x| * 2**-11 (e.g. <= 0.0156 for |x| < 32).
  bf16  bfloat16 bit patterns stored as uint16 (attribute dtype="bfloat16"),
        round-to-nearest-even: worst-case error |x| * 2**-8.
  q16   log-probabilities (softmax is shift-invariant) as uint16 codes in a window below the
        row maximum, as llama.cpp's --kl-divergence-base file does with 16 nats; here the
        window is >= 24 nats.  Decoding gives lo + code * scale: error <= scale / 2
        (<= 1.84e-4 nats for a 24-nat window) inside the window; a clamped entry gains at most
        p_max * e**-window of probability.
"""

from __future__ import annotations

import numpy as np

from engine.errors import EngineError
from kernels.codecs import CODECS, MIN_Q16_WINDOW, Q16_MAX_CODE


def check_codec(codec: str, window: float = MIN_Q16_WINDOW) -> None:
    if codec not in CODECS:
        raise EngineError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if codec == "q16" and not window >= MIN_Q16_WINDOW:
        raise EngineError(f"q16_window must be >= {MIN_Q16_WINDOW} nats, got {window}")


def decode(codec: str, data: np.ndarray, scale=None, offset=None) -> np.ndarray:
    """Decode stored rows [..., vocab] to float32 (logits, or log-probabilities for q16)."""
    if codec in ("fp16", "fp32"):
        return np.asarray(data, dtype=np.float32)
    if codec == "bf16":
        return (np.asarray(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if codec == "q16":
        if scale is None or offset is None:
            raise EngineError("q16 decoding needs the per-row scale and offset")
        s = np.asarray(scale, dtype=np.float32)[..., None]
        o = np.asarray(offset, dtype=np.float32)[..., None]
        return o + np.asarray(data, dtype=np.uint16).astype(np.float32) * s
    raise EngineError(f"unknown codec {codec!r}")


def worst_case_error(codec: str, max_abs: float, window: float = MIN_Q16_WINDOW) -> float:
    """Documented worst-case absolute error of one decoded entry (see module docstring).

    For fp16/bf16/fp32 it is relative to the entry's magnitude (`max_abs` bounds it); for q16
    it is the half-step of the widest window, in nats of log-probability.
    """
    if codec == "fp32":
        return 0.0
    if codec == "fp16":
        return max_abs * 2.0**-11
    if codec == "bf16":
        return max_abs * 2.0**-8
    if codec == "q16":
        return window / Q16_MAX_CODE / 2 + 4 * np.finfo(np.float32).eps * window
    raise EngineError(f"unknown codec {codec!r}")
