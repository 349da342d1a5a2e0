"""Storage codecs for full-vocabulary logit rows (specified in docs/archive-format.md).

Encoding runs in torch on the model's device (before the device-to-host copy, so the copy
moves the compact form); decoding is a plain numpy function used by the reader and as the
reference for the in-kernel decoders in `kernels/`.

Codecs, per row of V logits:
  fp32  float32, exact for fp32/bf16/fp16 models.
  fp16  float16; finite values beyond +-65504 saturate, -inf (masked tokens) is kept.
        Worst-case error |x| * 2**-11 (e.g. <= 0.0156 for |x| < 32).
  bf16  bfloat16 bit patterns stored as uint16 (attribute dtype="bfloat16"),
        round-to-nearest-even: worst-case error |x| * 2**-8.
  q16   log-probabilities (not raw logits: softmax is shift-invariant) as uint16 codes in a
        window below the row maximum, as llama.cpp's --kl-divergence-base file does with 16
        nats; here the window is `window` >= 24 nats.  lo = max(min_lp, max_lp - window),
        scale = (max_lp - lo) / 65535, code = round((lp - lo) / scale); entries below the window
        (and -inf) are clamped to lo.  Decoding gives lo + code * scale: error <= scale / 2
        (<= 1.84e-4 nats for a 24-nat window) inside the window; a clamped entry gains at most
        p_max * e**-window of probability.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.errors import EngineError

CODECS = ("fp16", "fp32", "bf16", "q16")
#: numpy storage dtype of each codec's logits dataset
STORAGE_DTYPE = {"fp16": np.float16, "fp32": np.float32, "bf16": np.uint16, "q16": np.uint16}
FP16_MAX = 65504.0
Q16_MAX_CODE = 65535
MIN_Q16_WINDOW = 24.0


def check_codec(codec: str, window: float = MIN_Q16_WINDOW) -> None:
    if codec not in CODECS:
        raise EngineError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if codec == "q16" and not window >= MIN_Q16_WINDOW:
        raise EngineError(f"q16_window must be >= {MIN_Q16_WINDOW} nats, got {window}")


def encode(codec: str, logits: torch.Tensor, window: float = MIN_Q16_WINDOW):
    """Encode `logits` [rows, vocab] (any float dtype, any device).

    Returns (data [rows, vocab] in the codec's storage dtype as a torch tensor on the same
    device, scale [rows] float32 or None, offset [rows] float32 or None).
    """
    if codec == "fp32":
        return logits.float(), None, None
    if codec == "fp16":
        x = logits.float()
        y = x.clamp(-FP16_MAX, FP16_MAX)
        y = torch.where(x == -torch.inf, x, y)  # keep masked tokens masked
        return y.half(), None, None
    if codec == "bf16":
        # torch's float -> bfloat16 cast rounds to nearest even; keep the bit pattern.
        return logits.float().to(torch.bfloat16).view(torch.int16), None, None
    if codec == "q16":
        # log_softmax in float64: torch's float32 version is off by up to ~2e-5 nats at these
        # vocabularies (float32 log-sum-exp), a tenth of the code step; [batch, vocab] is small.
        lp = torch.log_softmax(logits.double(), dim=-1)
        hi = lp.max(dim=-1).values  # [rows]
        lo = torch.maximum(lp.min(dim=-1).values, hi - window)
        scale = (hi - lo) / Q16_MAX_CODE
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        code = torch.round((lp.clamp(min=lo[:, None]) - lo[:, None]) / safe[:, None])
        code = code.clamp(0, Q16_MAX_CODE).to(torch.int32)
        # store as int16 bit pattern (torch has no uint16 arithmetic on every device)
        data = torch.where(code > 32767, code - 65536, code).to(torch.int16)
        return data, scale.float(), lo.float()
    raise EngineError(f"unknown codec {codec!r}")


def to_numpy(codec: str, data: torch.Tensor) -> np.ndarray:
    """Device tensor from `encode` -> host numpy array in the storage dtype."""
    arr = data.detach().cpu().numpy()
    return arr.view(np.uint16) if codec in ("bf16", "q16") else arr


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
