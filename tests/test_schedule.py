"""The batch schedule's grids (`engine.runtime.schedule.batches`): every sample once, batches
on the grid whatever the start, and where the two grids agree."""

from hypothesis import given
from hypothesis import strategies as st

from engine.runtime.schedule import batches, straddles

runs = st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 12))


@given(runs, st.booleans(), st.data())
def test_every_sample_once_and_a_resumed_run_decodes_the_same_batches(run, across, data):
    P, M, B = run
    full = list(batches(P, M, B, 0, across=across))
    assert [i for _, s0, s1 in full for i in range(s0, s1)] == list(range(P * M))
    for p, s0, s1 in full:
        assert 0 < s1 - s0 <= B and p == s0 // M
        if not across:  # one prompt per batch
            assert (s1 - 1) // M == p
    start = data.draw(st.integers(0, P * M))
    tail = list(batches(P, M, B, start, across=across))
    # a run resumed at `start` finishes the batch it was in, then decodes the grid's own
    cut = [(max(s0, start) // M, max(s0, start), s1) for _, s0, s1 in full if s1 > start]
    assert tail == cut


@given(runs)
def test_the_grids_agree_where_no_batch_straddles(run):
    P, M, B = run
    within, across = list(batches(P, M, B, 0)), list(batches(P, M, B, 0, across=True))
    many = [b for b in across if (b[1] // M) != ((b[2] - 1) // M)]
    assert straddles(P, M, B, True) == bool(many)
    assert (within == across) == (not many)
    assert not straddles(P, M, B, False)
