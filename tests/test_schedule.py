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


def test_each_row_reads_its_own_prompt():
    """`prompt_groups` runs of consecutive rows and `row_prompt` (the self-check's lookup) on
    rows of three prompts, 3 + 1 + 4 rows, and on one prompt for every row."""
    from engine.runtime.sampling import prompt_groups, row_prompt

    a, b, c = [5, 6], [7], [8, 9, 10]
    rows = [a, a, a, b, c, c, c, c]
    groups = prompt_groups(rows, len(rows))
    assert groups == [(a, 3), (b, 1), (c, 4)]
    assert [row_prompt(groups, i) for i in range(len(rows))] == rows
    one = prompt_groups(a, 4)
    assert one == [(a, 4)] and [row_prompt(one, i) for i in range(4)] == [a] * 4
