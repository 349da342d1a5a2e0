"""The logit codecs of the archive (docs/archive-format.md, "Codecs"): one table read by the
archive package (`engine.archive.format`, `engine.archive.codecs`), the run layer's encoder
(through `engine.archive.format`) and the kernels (`kernels.Encoded`, the numba decoders).

A leaf module: numpy only.  It must not import torch or `kernels.api`, because the archive
package imports it and reading an archive never imports torch.
"""

from __future__ import annotations

import numpy as np

CODECS = ("fp16", "fp32", "bf16", "q16")
#: numpy dtype a codec's rows are stored in (bf16 bit patterns and q16 codes are uint16)
STORAGE_DTYPE = {"fp16": np.float16, "fp32": np.float32, "bf16": np.uint16, "q16": np.uint16}
#: codecs whose stored rows are bit patterns or codes (uint16), not floats numpy reads as such
CODED = tuple(c for c, dt in STORAGE_DTYPE.items() if dt is np.uint16)

FP16_MAX = 65504.0  # largest finite float16: fp16 saturates finite values beyond it
Q16_MAX_CODE = 65535  # largest q16 code (the row maximum)
MIN_Q16_WINDOW = 24.0  # nats: the narrowest q16 window below the row maximum

#: codecs `kernels.Encoded` carries as uint16 data, and the numba decoder kind of each
#: (`kernels._numba.DECODERS`); fp32 needs no decoding and is passed as a plain array
KERNEL_KIND = {"bf16": "bf16", "q16": "q16", "fp16": "f16"}
