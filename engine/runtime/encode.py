"""Torch-side encoding of logit rows into the archive's codecs (the run layer's half of
`engine.archive.codecs`, which decodes with numpy and documents each codec's error).

Encoding runs on the model's device, before the device-to-host copy, so the copy moves the
compact form; the result is host numpy in the codec's storage dtype, ready for the writer.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.archive.format import FP16_MAX, MIN_Q16_WINDOW, Q16_MAX_CODE
from engine.errors import EngineError
from kernels.codecs import CODED


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
    return arr.view(np.uint16) if codec in CODED else arr
