"""Numerical constants shared by the numba (`_numba`, `_bits`) and torch (`_torch`) kernels.

One definition, so the two backends cannot drift apart (they did: the exp floor was -86 in
one and -87 in the other).  A leaf module: it imports nothing, and `_numba.SOURCE_HASH`
covers this file, so an edit here invalidates the numba on-disk cache.
"""

#: d = x - max(x) at or below which exp(d) counts as exactly 0, and the value d is clamped to
#: so that 0 * d stays 0 (d = -inf for masked tokens).  Why -87:
#:  * exp(-87) = 2**-125.5 < 2**-125 relative to the row maximum (which contributes exp(0) = 1
#:    to every sum), so dropping these entries, or counting them at the floor, changes no
#:    float64 total (ulp of 1 is 2**-52), and exp(-87) * -87 is still a normal float32;
#:  * `_bits.exp_nonpos` clamps d to the floor and builds 2**k from exponent bits with
#:    k = round(d * log2(e)); that needs k >= -126 (biased exponent k + 127 >= 1, a normal
#:    float32), which holds for floors down to about -87.68: round(-87 * log2(e)) = -126.
#:    A floor of -88 gives k = -127, exponent field 0, and entries in (-88, -87.3] would decode
#:    to 0 instead of their (subnormal) value.
EXP_FLOOR = -87.0

#: entries summed in float32 before the block total is folded into a float64 total: a float32
#: sum of 2048 entries keeps ~1e-7 relative error (<= 128 adds per vector lane), where a float32
#: sum over a 152k vocabulary drifts by 1e-5; the float64 fold keeps totals at ~1e-12.
SUM_BLOCK = 2048

#: torch backend: rows per block are chosen so one float32 working copy of a block
#: [rows, vocab] stays under this many bytes.
BLOCK_BYTES = 64 << 20

#: f''(g) = Var_g[d] at or below which a row's gamma is unidentified (p^g is one-hot or
#: uniform, the same for every g): `fit_gamma` reports NaN for it.
FLAT_VARIANCE = 1e-300
