"""Property tests (Hypothesis) and planted-ground-truth recovery for the kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kernels as K
from kernels import reference as R

finite = st.floats(-40, 40, allow_nan=False, width=32)
entry = st.one_of(finite, finite, finite, st.just(-np.inf))


@st.composite
def logit_rows(draw, min_v=1, max_v=300):
    V = draw(st.integers(min_v, max_v))
    rows = draw(st.integers(1, 4))
    x = draw(arrays(np.float32, (rows, V), elements=entry))
    x[:, draw(st.integers(0, V - 1))] = draw(finite)  # at least one finite entry per row
    return x


@settings(max_examples=60, deadline=None)
@given(logit_rows())
def test_entropy_between_zero_and_log_v(x):
    h = K.entropy(x)
    n_finite = np.isfinite(x).sum(-1)
    assert np.all(h >= -1e-6) and np.all(h <= np.log(n_finite) + 1e-6)
    t5 = K.entropy(x, topk=5)
    assert np.all(t5 >= -1e-6) and np.all(t5 <= np.log(np.minimum(5, n_finite)) + 1e-6)


@settings(max_examples=60, deadline=None)
@given(logit_rows(min_v=2), st.floats(0.1, 3.0), st.integers(0, 2**31))
@example(np.array([[32.0, 19.0]], np.float32), 1.0, 0)  # KL -3.2e-6 in float32 (CI, once)
@example(np.array([[38.1875, 25.0625]], np.float32), 1.0, 1)  # JS -1.1e-6
def test_divergence_properties(x, scale, seed):
    noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    q = np.where(np.isfinite(x), x * np.float32(scale) + noise, -np.inf).astype(np.float32)
    s = K.pair_stats(x, q)
    # float32 log-softmax carries an absolute error up to eps32 x the row's logit range, so a
    # KL of two close rows may land that far below 0 (x = [32, 19] against its noisy copy gave
    # -3.2e-6): the bound per row is 2 eps32 (range p + range q), not a fixed 1e-6
    fin = lambda z: np.where(np.isfinite(z), z, np.nan)  # noqa: E731
    span = lambda z: np.nanmax(fin(z), -1) - np.nanmin(fin(z), -1)  # noqa: E731
    tol = 2 * np.finfo(np.float32).eps * (span(x) + span(q)) + 1e-6
    assert np.all(s.kl_pq >= -tol) and np.all(s.kl_qp >= -tol)
    assert np.all(s.js >= -tol) and np.all(s.js <= np.log(2) + tol)
    assert np.all((s.tv >= -1e-7) & (s.tv <= 1 + 1e-6))
    r = K.pair_stats(q, x)
    np.testing.assert_allclose(s.js, r.js, atol=tol.max())  # JS is symmetric
    np.testing.assert_allclose(s.kl_pq, r.kl_qp, atol=tol.max(), rtol=1e-6)
    same = K.pair_stats(x, x)
    assert np.all(np.abs(same.kl_pq) <= 1e-6) and np.all(same.argmax_agree == 1)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.2, 5.0), st.integers(0, 2**31), st.sampled_from([64, 1000, 5000]))
def test_fit_gamma_recovers_planted_power(gamma, seed, V):
    """q = gamma * log_softmax(p) exactly: the fit returns gamma to 1e-4, on both backends."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((3, V)) * rng.uniform(1, 4)).astype(np.float32)
    lp = R.log_softmax(p.astype(np.float64))
    q = (gamma * lp).astype(np.float32)
    f = K.fit_gamma(p, q)
    np.testing.assert_allclose(f.gamma, gamma, atol=1e-4 * max(1, gamma))
    assert np.all(f.kl <= 1e-6)
    t = K.fit_gamma(torch.from_numpy(p), torch.from_numpy(q))
    np.testing.assert_allclose(t.gamma.numpy(), gamma, atol=1e-4 * max(1, gamma))


@pytest.mark.parametrize("gamma", [0.6, 1.0, 1.5, 2.5])
def test_noisy_planted_gamma_is_inside_bootstrap_interval(gamma):
    """q ∝ p^gamma * exp(noise): the pooled fit's 95% interval covers gamma, is tight, and a
    wrong gamma is outside it."""
    rng = np.random.default_rng(int(gamma * 100))
    p = (rng.standard_normal((400, 2000)) * 2).astype(np.float32)
    q = (gamma * R.log_softmax(p.astype(np.float64)) + rng.standard_normal(p.shape) * 0.3).astype(
        np.float32
    )
    fit = K.fit_gamma_pooled(p, q, n_boot=1000, seed=1)
    assert fit.ci_low <= gamma <= fit.ci_high, fit
    assert fit.ci_high - fit.ci_low < 0.05 * gamma
    assert not (fit.ci_low <= gamma * 1.1 <= fit.ci_high)
    assert fit.kl < fit.kl_at_1 or gamma == 1.0


def test_grouped_bootstrap_widens_the_interval_for_correlated_rows():
    """Rows of one completion share their deviation from gamma (planted: each group of 10 rows
    has its own power gamma + delta_g).  Resampling rows treats 400 rows as independent and is
    too narrow; resampling groups must give a clearly wider interval that covers gamma, with
    the same point estimate."""
    rng = np.random.default_rng(7)
    gamma, n_groups, per = 1.5, 40, 10
    p = (rng.standard_normal((n_groups * per, 2000)) * 2).astype(np.float32)
    g_row = np.repeat(gamma + rng.normal(0, 0.05, n_groups), per)[:, None]
    q = (g_row * R.log_softmax(p.astype(np.float64))).astype(np.float32)
    rows = K.fit_gamma_pooled(p, q, n_boot=1000, seed=1)
    grouped = K.fit_gamma_pooled(
        p, q, groups=np.repeat(np.arange(n_groups), per), n_boot=1000, seed=1
    )
    assert grouped.gamma == pytest.approx(rows.gamma)
    assert grouped.ci_high - grouped.ci_low > 2 * (rows.ci_high - rows.ci_low), (rows, grouped)
    assert grouped.ci_low <= gamma <= grouped.ci_high, grouped


def test_pooled_gamma_matches_brute_force_minimum():
    rng = np.random.default_rng(3)
    p = (rng.standard_normal((20, 500)) * 2).astype(np.float32)
    q = (1.8 * p + rng.standard_normal(p.shape)).astype(np.float32)
    w = rng.uniform(0.5, 2, 20)
    fit = K.fit_gamma_pooled(p, q, weights=w, n_boot=10)
    grid = np.linspace(1.0, 2.6, 1601)
    obj = [
        np.sum(
            w
            * np.array(
                [
                    R.kl_to_tempered(a, b, g)
                    for a, b in zip(p.astype(np.float64), q.astype(np.float64))
                ]
            )
        )
        for g in grid[::40]
    ]
    g0 = grid[::40][int(np.argmin(obj))]
    assert abs(fit.gamma - g0) <= 0.04
    kl_at = (
        np.sum(
            w
            * np.array(
                [
                    R.kl_to_tempered(a, b, fit.gamma)
                    for a, b in zip(p.astype(np.float64), q.astype(np.float64))
                ]
            )
        )
        / w.sum()
    )
    assert fit.kl == pytest.approx(kl_at, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(logit_rows(min_v=3), st.floats(0.3, 3.0))
# H is flat past g ~ 2 here (two equal logits, the third at -19 weighs e^-38): the target
# H(2) came out 3.6e-15 below the bracket's end H(1e4), in float rounding only
@example(np.array([[8.2380303e-19, 0.0, -19.0, -np.inf]], np.float32), 2.0)
def test_gamma_for_entropy_inverts_tempered_entropy(x, g):
    x = np.where(np.isfinite(x), x, -np.inf).astype(np.float32)
    spread = np.nanstd(np.where(np.isfinite(x), x, np.nan), -1) > 0.5
    assume(spread.any())  # rows with (almost) equal logits have no entropy to invert
    x = x[spread]
    target = K.tempered_entropy(x, [g])[:, 0]
    got = K.gamma_for_entropy(x, target)
    assert np.all(np.isfinite(got)), got  # every target comes from a finite power: invertible
    back = np.array(
        [K.tempered_entropy(x[i : i + 1], [float(got[i])])[0, 0] for i in range(len(x))]
    )
    np.testing.assert_allclose(back, target, atol=1e-5)
    h = K.tempered_entropy(x, [0.5, 1.0, 2.0, 4.0])
    assert np.all(np.diff(h, axis=-1) <= 1e-6)  # entropy falls as the power rises


def test_bootstrap_ci_covers_mean():
    v = np.random.default_rng(0).normal(3.0, 1.0, 500)
    lo, hi = K.bootstrap_ci(v, n_boot=2000)
    assert lo < 3.0 < hi and hi - lo < 0.3


def test_pooled_fit_from_streamed_moments_equals_in_memory_fit():
    """pooled_from_moments with a blockwise moments callable (as the pair analysis streams an
    archive) gives the in-memory pooled fit exactly."""
    rng = np.random.default_rng(5)
    p = (rng.standard_normal((60, 700)) * 2).astype(np.float32)
    q = (1.3 * p + rng.standard_normal(p.shape) * 0.5).astype(np.float32)
    groups = np.repeat(np.arange(12), 5)
    ref = K.fit_gamma_pooled(p, q, groups=groups, n_boot=300, seed=2)
    base = np.concatenate([K.gamma_base(p[i : i + 7], q[i : i + 7]) for i in range(0, 60, 7)])
    calls = []

    def moments_at(g):
        calls.append(g)
        return np.concatenate(
            [K.tempered_moments(p[i : i + 7], [g])[:, 0] for i in range(0, 60, 7)]
        )

    got = K.pooled_from_moments(base, moments_at, groups=groups, n_boot=300, seed=2)
    assert got == pytest.approx(ref, rel=1e-12)
    assert 1 <= len(calls) <= 10
