"""Every code snippet in README.md and docs/*.md works as written.

python blocks run (file names pointed at a real archive); bash blocks are read command by
command: each `python -m engine <verb>` / `python -m analyses` command line is composed with
Hydra exactly as its overrides say, every multirun point included (unknown keys, groups or
options fail here); `inspect`, `merge`, `verify` and `bench.*` commands are parsed by their
own argument parsers; `make` targets must exist.  A command of any other kind fails the test, so a new
snippet cannot slip past it.  Blocks without a language (layouts, trees, outputs) are not code.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from itertools import product

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from analyses.protocol import CONF as ANALYSES_CONF
from engine.commands import VERBS
from engine.config import CONF
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def blocks(lang: str):
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            if m.group(1) == lang:
                yield doc.name, m.group(2)


def commands(text: str) -> list[list[str]]:
    """Command lines of a bash block: continuations joined, comments and prompts dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(shlex.split(line, comments=True))
    return out


BASH = [(name, cmd) for name, text in blocks("bash") for cmd in commands(text)]


def compose_all(config: str, args: list[str]) -> int:
    """Compose `config` with the command's overrides, once per multirun point."""
    multirun = "-m" in args or "--multirun" in args
    args = [a for a in args if a not in ("-m", "--multirun")]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(args)
    hydra_side = [o.input_line for o in parsed if o.key_or_group.startswith("hydra")]
    task = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    choices = []
    for o in task:
        if o.is_sweep_override():
            if not multirun:
                raise AssertionError(f"sweep {o.input_line} without -m")
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    n = 0
    conf = ANALYSES_CONF if config == "analyses" else CONF
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for point in product(*choices):
            compose(config, overrides=list(point))
            n += 1
    assert all(h.split("=", 1)[0].split("/")[0].startswith("hydra") for h in hydra_side)
    return n


@pytest.mark.parametrize("doc, cmd", BASH, ids=[f"{d}:{' '.join(c)[:60]}" for d, c in BASH])
def test_documented_command_works_as_written(doc, cmd):
    if cmd[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(cmd[1:]) <= set(targets), cmd
        return
    assert cmd[0] in (".venv/bin/python", "python") and cmd[1] == "-m", cmd
    module, args = cmd[2], cmd[3:]
    if module == "engine":
        verb, args = args[0], args[1:]
        assert verb in VERBS, verb
        if not VERBS[verb].hydra:
            import importlib

            importlib.import_module(VERBS[verb].module).parser().parse_args(args)  # exits
            return  # (fails the test) on an unknown flag
        assert compose_all(verb, args) >= 1  # each Hydra verb's config is named after it
    elif module == "analyses":
        assert compose_all("analyses", args) >= 1
    elif module.startswith("bench."):
        res = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-1000:]
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in res.stdout, (flag, module)
    else:
        raise AssertionError(f"{doc}: no check for this kind of command: {' '.join(cmd)}")


def test_python_snippets_run(tiny_archive):
    """python blocks run as written, with the archive file names they mention pointed at a real
    archive (the spec's reading example must give the reader's own decoding)."""
    from engine.archive import Archive
    from kernels import reference as R

    snippets = list(blocks("python"))
    assert snippets, "no python snippets found"
    for name, code in snippets:
        code = re.sub(r"\"[\w./-]+\.h5\"", repr(str(tiny_archive)), code)
        scope: dict = {}
        exec(compile(code, name, "exec"), scope)  # noqa: S102
        if "logp" in scope:
            with Archive(tiny_archive) as a:
                n = int(a.samples()["length"][0])
                want = R.log_softmax(a.model().rows(0, slice(0, n)).astype(np.float64))
            np.testing.assert_allclose(scope["logp"], want, atol=1e-6)


def test_every_bash_block_was_checked():
    n_blocks = sum(1 for _ in blocks("bash"))
    assert n_blocks >= 8 and len(BASH) >= 20, (n_blocks, len(BASH))


def test_every_verb_is_documented_in_the_readme():
    """The README shows each verb of `engine.commands.VERBS` as a command line."""
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in VERBS if f"python -m engine {v}" not in readme]
    assert not missing, missing
