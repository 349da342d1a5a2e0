"""Verbalized Sampling's numbers on sampled answers (`analyses.answers.vs_metrics`), checked
against values worked out by hand from the definitions in their published code
(CHATS-lab/verbalized-sampling 0.1.3: verbalized_sampling/analysis/evals/response_count.py,
analyse/pre_training_distribution/calc_kl_divergence_vs.py).  Pure functions: no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses.answers import VS_EPS, vs_metrics, vs_normalise
from engine.errors import EngineError

CANDS = ["Ohio", "Texas", "Utah", "Iowa"]
REF = np.array([1.0, 2.0, 3.0, 4.0])  # normalised: 0.1, 0.2, 0.3, 0.4
#  normalised: "ohio" x3, "texas" x1 correct; " texas" (leading space kept), "maine" (no
#  candidate) and "texas " (the space before the dot stays once the dot is gone) are not
ANSWERS = ["Ohio", "ohio.", "OHIO", "Texas  ", " Texas", "Maine", "Texas ."]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("New York. ", "new york"),  # trailing space, then the dot
        ("Texas...", "texas"),  # every trailing dot
        ("Ohio .", "ohio "),  # rstrip() runs before rstrip("."): the inner space stays
        (" Ohio", " ohio"),  # no left strip in their code
        ("St. Louis", "st. louis"),  # inner dots stay
    ],
)
def test_normalisation_is_theirs(text, expected):
    assert vs_normalise(text) == expected


def test_hand_computed_numbers():
    m = vs_metrics(ANSWERS, CANDS, REF)
    assert (m["n_responses"], m["n_correct"], m["n_distinct_correct"]) == (7, 4, 2)
    assert m["precision"] == pytest.approx(4 / 7, abs=1e-15)  # correct / all answers
    assert m["coverage_n"] == 0.5  # 2 distinct correct of 4 candidates
    # observed p = (3/4, 1/4), uniform 1/4: 3/4 ln 3 + 1/4 ln 1
    assert m["kl_to_uniform"] == pytest.approx(0.75 * math.log(3), abs=1e-9)
    # KL(reference || observed) over Ohio and Texas only: g = (1/3, 2/3), q = (3/4, 1/4)
    by_hand = (1 / 3) * math.log(4 / 9) + (2 / 3) * math.log(8 / 3)
    assert by_hand == pytest.approx(0.3835760966, abs=1e-10)
    assert m["kl_reference_to_observed"] == pytest.approx(by_hand, abs=1e-9)


def test_epsilon_and_total_as_their_code():
    """Their p = counts / T + 1e-10, renormalised, with T = all answers of the prompt (7), not
    the correct ones (4): the two differ by ~4e-11 nats here, which the tolerance resolves."""
    e = VS_EPS
    p = np.array([3 / 7 + e, 1 / 7 + e])
    p /= p.sum()
    kl = float(np.sum(p * np.log(p * 4)))
    q4 = np.array([3 / 4 + e, 1 / 4 + e])
    q4 /= q4.sum()
    assert abs(kl - float(np.sum(q4 * np.log(q4 * 4)))) > 1e-11  # T matters at this tolerance
    assert vs_metrics(ANSWERS, CANDS)["kl_to_uniform"] == pytest.approx(kl, abs=1e-14)
    g = np.array([0.1 + e, 0.2 + e])
    q = np.array([3 / 7 + e, 1 / 7 + e])
    g, q = g / g.sum(), q / q.sum()
    ref = float(np.sum(g * np.log(g / q)))
    assert vs_metrics(ANSWERS, CANDS, REF)["kl_reference_to_observed"] == pytest.approx(
        ref, abs=1e-14
    )


def test_collapsed_model_scores_zero_kl_to_the_reference():
    """Always "Texas": KL to uniform log 4 (as the full support gives), but KL(reference ||
    observed) over the observed answers only is 0, the best score, for total mode collapse."""
    m = vs_metrics(["Texas"] * 5, CANDS, REF)
    assert m["kl_to_uniform"] == pytest.approx(math.log(4), abs=1e-9)
    assert m["kl_reference_to_observed"] == pytest.approx(0.0, abs=1e-15)
    assert (m["coverage_n"], m["precision"]) == (0.25, 1.0)


def test_even_split_and_nothing_correct():
    m = vs_metrics(["Utah", "Iowa", "utah.", "IOWA"], CANDS)
    assert m["kl_to_uniform"] == pytest.approx(math.log(2), abs=1e-12)
    assert "kl_reference_to_observed" not in m  # no reference given
    m = vs_metrics(["Maine", "x"], CANDS, REF)  # their conventions: 0.0 for empty counts
    assert m == {
        "n_responses": 2,
        "n_correct": 0,
        "n_distinct_correct": 0,
        "precision": 0.0,
        "coverage_n": 0.0,
        "kl_to_uniform": 0.0,
        "kl_reference_to_observed": 0.0,
    }


def test_bad_inputs_get_one_clear_error():
    with pytest.raises(EngineError, match="same answer after"):
        vs_metrics(["Ohio"], ["Ohio", "ohio."])
    with pytest.raises(EngineError, match="no sampled answers"):
        vs_metrics([], CANDS)
