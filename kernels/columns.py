"""Named columns of `gamma_base` rows [rows, 7] (shared by the numba and torch kernels and
their callers, so nobody reads them by bare index).

For p (base) and q (aligned) logits with d_p = p's logits minus their max:
  Q_DP   E_q[d_p]
  Q_LOGQ E_q[log q]  (= -H(q))
  LOG_S  log S_p = log sum exp(d_p)     } the tempered moments of d_p at gamma = 1,
  M1     E_p[d_p]                       } so H(p) = LOG_S - M1
  M2     E_p[d_p^2]                     }
  M3     E_p[d_p^3]                     }
  P_MAX  max of p's logits
"""

Q_DP, Q_LOGQ, LOG_S, M1, M2, M3, P_MAX = range(7)
N_COLUMNS = 7
MOMENTS = slice(LOG_S, M3 + 1)  # the [rows, 4] block `tempered_moments(p, [1])` gives
