"""Named columns of `gamma_base` rows [rows, 7], `tempered_moments` rows [..., 4] and the
kernels' outputs behind `PairStats` and `GammaFit` (shared
by the numba and torch kernels and their callers, so nobody reads them by bare index; numba
reads these module-level ints as compile-time constants, and `_numba.SOURCE_HASH` covers this
file).

For p (base) and q (aligned) logits with d_p = p's logits minus their max:
  Q_DP   E_q[d_p]
  Q_LOGQ E_q[log q]  (= -H(q))
  LOG_S  log S_p = log sum exp(d_p)     } the tempered moments of d_p at gamma = 1,
  M1     E_p[d_p]                       } so H(p) = LOG_S - M1
  M2     E_p[d_p^2]                     }
  M3     E_p[d_p^3]                     }
  P_MAX  max of p's logits

A `tempered_moments` row at gamma holds the same four moments under p^gamma:
  TM_LOG_S, TM_M1, TM_M2, TM_M3  (log S(gamma), E[d], E[d^2], E[d^3])
"""

Q_DP, Q_LOGQ, LOG_S, M1, M2, M3, P_MAX = range(7)
N_COLUMNS = 7
MOMENTS = slice(LOG_S, M3 + 1)  # the [rows, 4] block `tempered_moments(p, [1])` gives

TM_LOG_S, TM_M1, TM_M2, TM_M3 = range(4)
N_MOMENTS = 4

# The kernels' output rows behind the public NamedTuples, in their fields' order (the field
# name upper-cased is the column's name here; tests check the two orders agree):
# `pair_stats` [..., 9] -> kernels.PairStats, `fit_gamma` [..., 4] -> kernels.GammaFit.
KL_PQ, KL_QP, JS, TV, ARGMAX_AGREE, DP, LOGP_TOKEN, LOGQ_TOKEN, Q_TOP_RANK_IN_P = range(9)
N_PAIR = 9
GAMMA, KL, KL_AT_1, ITERATIONS = range(4)
N_FIT = 4
