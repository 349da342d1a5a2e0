"""Archived files of every earlier format version read through the current reader.

tests/data/ holds archives written by earlier engines (tiny-random, 2 prompts x 2 samples x 5
steps):
  v1-60faf68.h5          format_version 1 as first written (generator group only)
  v1-eccb3f7.h5          format_version 1 as last written: a scored q16 group (tempered 1.5)
  v1-eccb3f7-perturb.h5  format_version 1 perturbation archive with /lineage
  v2-12937d2.h5          format_version 2 as last written: generator + scored q16 group
                         (tempered 1.5); no `nonfinite` finish reason, no device provenance
  v3-e9b6ae1.h5          format_version 3 as last written: generator + scored q16 group
                         (tempered 1.5); no `host`, never sharded or merged
  v4-d9aa91f.h5          format_version 4 as last written (same run, same commands, made from a
                         `git worktree` of d9aa91f): no checksums, no `self_check` slot; verify
                         refuses it with one line
  v5-2a7bf2e.h5          format_version 5 as last written (same run, same commands): checksums
                         and `self_check`, no logit lens, no layer pairs
Version 1 generator groups carry no n_complete/complete/role/chat_template of their own; the
reader derives them from the root attributes and run_key.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import kernels as K
from engine.archive import Archive
from engine.archive import format as F
from engine.commands.inspect import main as inspect_main

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("v*.h5"))


def test_there_is_a_fixture_for_every_earlier_version():
    versions = {int(h5py.File(p, "r").attrs["format_version"]) for p in FIXTURES}
    assert versions == set(range(1, F.FORMAT_VERSION)), versions


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_old_archive_reads_through_current_reader(path, capsys):
    with Archive(path) as a, h5py.File(path, "r") as f:
        assert a.format_version == int(path.name[1]) and a.complete
        assert a.n_complete == a.n_samples
        gen = a.model()
        assert gen.role == "generator" and gen.n_complete == a.n_samples and gen.complete
        assert gen.chat_template is False  # dumped with the raw prompts
        s = a.samples()
        assert s["tokens"].shape == (a.n_samples, a.max_new_tokens)
        for key, m in a.models.items():
            g = f["models"][key]
            for i in range(a.n_samples):
                n = int(s["length"][i])
                raw = g["logits"][i, :n]
                if m.codec == "q16":  # the spec's own decoding, by hand
                    want = (
                        g["logits_offset"][i, :n][:, None]
                        + raw.astype(np.float32) * g["logits_scale"][i, :n][:, None]
                    )
                else:
                    want = raw.astype(np.float32)
                np.testing.assert_array_equal(m.rows(i, slice(0, n)), want)
            assert m.prompt_tokens(0) == [int(t) for t in g["prompt_tokens"][0]]
        text = gen.text(s["tokens"][0, : int(s["length"][0])])
        assert isinstance(text, str) and len(text) > 0
        if "tiny-random-tempered-1.5" in a.models:
            tw = a.model("tiny-random-tempered-1.5")
            assert tw.role == "scored" and tw.codec == "q16" and tw.score_key["codec"] == "q16"
            gam = K.fit_gamma(gen.rows(0, slice(0, 3)), tw.rows(0, slice(0, 3))).gamma
            np.testing.assert_allclose(gam, 1.5, atol=0.02)  # fp16 base vs q16 twin: codec noise
        lin = a.lineage()
        if "perturb" in path.name:
            assert lin["variant"] == ["control", "edit"] and lin["control_prompt"].tolist() == [
                0,
                0,
            ]
            assert lin["source_archive"].endswith("v1-eccb3f7.h5")
        else:
            assert lin is None
        assert json.loads(f.attrs["run_key"]) == a.run_key
    assert inspect_main([str(path)]) == 0
    assert f"logit-archive v{path.name[1]}" in capsys.readouterr().out


def test_new_archives_are_the_current_version_with_explicit_group_state(tiny_archive):
    with h5py.File(tiny_archive, "r") as f:
        assert int(f.attrs["format_version"]) == F.FORMAT_VERSION == 6
        g = f["models"][f.attrs["generator"]]
        for k in F.GROUP_STATE:
            assert k in g.attrs, k
        assert g.attrs["role"] == "generator"
        assert g.attrs[F.SELF_CHECK].shape == (4,) and g[F.CHECKSUMS].shape == (6, 1)


PRE_CHECKSUMS = [p for p in FIXTURES if int(p.name[1]) < 5]


@pytest.mark.parametrize("path", PRE_CHECKSUMS, ids=lambda p: p.name)
def test_old_archives_have_no_checksums_and_verify_says_so_in_one_line(path, capsys):
    from engine.commands.verify import main as verify_main

    with Archive(path) as a:
        assert all(m.checksum_columns is None and m.self_check is None for m in a.models.values())
    with pytest.raises(SystemExit) as exc:
        verify_main([str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: no checksums (format version {path.name[1]})"), err


def test_version_5_archive_verifies_and_has_no_lens():
    """A version 5 file (checksums, no lens) verifies under the version 6 reader."""
    from engine.commands.verify import verify

    path = DATA / "v5-2a7bf2e.h5"
    with Archive(path) as a:
        assert a.format_version == 5 and a.layer_pairs == {}
        assert all(m.lens is None and m.checksum_columns for m in a.models.values())
    assert verify(path, progress=False).ok


def _spec_snippet() -> str:
    doc = (Path(__file__).parent.parent / "docs" / "archive-format.md").read_text()
    section = doc.split("## Reading with plain h5py", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("codec", ["fp16", "bf16", "q16"])
def test_the_specs_plain_h5py_example_runs_on_every_codec_and_version(codec, dump_cfg, tmp_path):
    """The spec's own reading example (no project code) gives the reader's log-probabilities."""
    from engine.commands import dump as dump_mod
    from kernels import reference as R

    new = dump_mod.run(
        dump_cfg("n_samples=1", "max_new_tokens=3", f"codec={codec}", f"out={tmp_path}/{codec}.h5")
    )["archive"]
    for path in [new, *FIXTURES]:
        scope: dict = {}
        exec(_spec_snippet().replace('"logits.h5"', repr(str(path))), scope)  # noqa: S102
        with Archive(path) as a:
            n = int(a.samples()["length"][0])
            want = R.log_softmax(a.model().rows(0, slice(0, n)).astype(np.float64))
        np.testing.assert_allclose(scope["logp"], want, atol=1e-6)
