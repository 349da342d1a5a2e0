"""Kernels: pure functions from logit arrays to per-row statistics (no I/O, no config).

numba on the CPU for numpy input, torch (CPU or CUDA) for tensors; `kernels.reference` holds
the float64 ground truth every kernel is tested against.  See `kernels.api` for semantics.
"""

from kernels.api import (
    Encoded,
    GammaFit,
    PairStats,
    TokenStats,
    branching_factor,
    entropy,
    fit_gamma,
    gamma_for_entropy,
    log_softmax,
    logsumexp,
    pair_stats,
    tempered_entropy,
    tempered_moments,
    token_stats,
)
from kernels.pooled import (
    PooledGamma,
    bootstrap_ci,
    fit_gamma_pooled,
    gamma_base,
    one_step_bootstrap,
    pooled_from_moments,
)

__all__ = [
    "Encoded",
    "GammaFit",
    "PairStats",
    "PooledGamma",
    "TokenStats",
    "bootstrap_ci",
    "branching_factor",
    "entropy",
    "fit_gamma",
    "fit_gamma_pooled",
    "gamma_base",
    "gamma_for_entropy",
    "log_softmax",
    "logsumexp",
    "one_step_bootstrap",
    "pair_stats",
    "pooled_from_moments",
    "tempered_entropy",
    "tempered_moments",
    "token_stats",
]
