"""The package's shape: layer contracts, torch-free reading, configs that install and compose."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import analyses
from analyses import protocol
from engine.config import CONF, options
from tests.conftest import ROOT, engine_cli

NO_TORCH = """
import sys, runpy
sys.argv = {argv!r}
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print("TORCH_LOADED=" + str("torch" in sys.modules))
"""


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--config", str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_import_linter_contracts_hold():
    """.importlinter: commands above runtime above stream above the archive package above
    kernels; the archive package imports no deep-learning library; analyses never import the
    runtime or the verbs; the shared modules import no layer."""
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


def test_a_new_runtime_module_imported_by_the_archive_breaks_the_contracts(tmp_path):
    """The contracts name packages: a module added under engine/runtime/ (named nowhere) is
    covered the moment it exists.  A copy of the tree passes; importing the new module from
    engine/archive/ breaks the layers contract."""
    import shutil

    for pkg in ("engine", "kernels", "analyses"):
        shutil.copytree(
            ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "conf")
        )
    shutil.copy(ROOT / ".importlinter", tmp_path)
    (tmp_path / "engine" / "runtime" / "brand_new.py").write_text("X = 1\n")
    assert _lint_imports(tmp_path).returncode == 0
    text = tmp_path / "engine" / "archive" / "text.py"
    text.write_text(text.read_text() + "\nfrom engine.runtime import brand_new  # noqa\n")
    res = _lint_imports(tmp_path)
    assert (
        res.returncode != 0 and "engine.archive.text -> engine.runtime.brand_new" in res.stdout
    ), res.stdout[-3000:]


def test_every_verb_is_registered_once_and_lies_in_commands():
    """engine.commands.VERBS is the one list of verbs: each has its module with a `main`, and
    every module in engine/commands/ but `common` is a verb."""
    import importlib

    from engine.commands import VERBS

    modules = {p.stem for p in (ROOT / "engine" / "commands").glob("*.py")} - {"__init__", "common"}
    assert modules == set(VERBS)
    for verb in VERBS.values():
        assert callable(importlib.import_module(verb.module).main), verb.name


def _run_without_torch(module: str, argv: list[str], tmp_path) -> str:
    res = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(argv=argv, module=module)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_inspect_verify_and_entropy_analysis_never_import_torch(tiny_archive, tmp_path):
    out = _run_without_torch(
        "engine", ["engine", "inspect", str(tiny_archive), "--render", "--limit", "1"], tmp_path
    )
    assert "TORCH_LOADED=False" in out, out[-2000:]
    out = _run_without_torch(
        "engine", ["engine", "verify", str(tiny_archive), "--no-progress"], tmp_path
    )
    assert "TORCH_LOADED=False" in out and "all match" in out, out[-2000:]
    out = _run_without_torch(
        "analyses",
        [
            "analyses",
            "analysis=entropy",
            f"archive={tiny_archive}",
            "progress=false",
            f"hydra.run.dir={tmp_path}/a",
        ],
        tmp_path,
    )
    assert "TORCH_LOADED=False" in out, out[-2000:]


#: per config root (engine/conf; analyses/conf, which reads paths/ and hydra/ from engine/conf):
#: its groups, each with a primary config that composes it, and its primary configs
GROUP_PRIMARY = {
    CONF: {
        "model": "dump",
        "prompts": "dump",
        "paths": "dump",
        "run": "dump",
        "sampling": "dump",
        "candidates": "answers",
    },
    protocol.CONF: {"analysis": "analyses"},
}
PRIMARY = {CONF: ("dump", "score", "perturb", "align", "answers"), protocol.CONF: ("analyses",)}
OPTIONS = {CONF: options, protocol.CONF: protocol.options}


def test_every_option_of_every_config_group_composes(tmp_path):
    n = 0
    for conf, group_primary in GROUP_PRIMARY.items():
        groups = [
            p.name
            for p in conf.iterdir()
            if p.is_dir() and p.name != "hydra" and not p.name.startswith("__")
        ]
        assert set(groups) == set(group_primary), "a new config group needs a primary config here"
        for group in groups:
            for option in OPTIONS[conf](group):
                # mandatory values (`???`, e.g. model=hf's name) get a placeholder, as a user
                # gives one
                raw = OmegaConf.load(conf / group / f"{option}.yaml")
                given = [f"{group}.{k}=probe" for k in raw.keys() if OmegaConf.is_missing(raw, k)]
                with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                    cfg = compose(
                        group_primary[group],
                        overrides=[f"{group}={option}", *given, f"paths.output_dir={tmp_path}"],
                    )
                plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
                assert plain, (group, option)
                n += 1
        for primary in PRIMARY[conf]:
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                cfg = compose(primary, overrides=[f"paths.output_dir={tmp_path}"])
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert n >= 25


def test_every_analysis_is_registered_declared_and_configured():
    """The modules of the analyses package (helpers in analyses.lib aside), the registry
    (`protocol.NAMES`) and the configs (analyses/conf/analysis/*.yaml) name the same analyses;
    each module declares an `Analysis` of its own name whose callables take what the runner
    passes, and a module's `terminal_lines` is the one it declares."""
    infrastructure = {"__main__", "protocol"}
    found = {m.name: m.ispkg for m in pkgutil.iter_modules(analyses.__path__)}
    assert {name for name, pkg in found.items() if pkg} == {"lib"}, "helpers belong in analyses.lib"
    modules = {name for name, pkg in found.items() if not pkg} - infrastructure
    assert modules == set(protocol.NAMES), "an analysis module must be listed in protocol.NAMES"
    assert protocol.options("analysis") == sorted(protocol.NAMES), "one config per analysis"
    for name in protocol.NAMES:
        module = importlib.import_module(f"analyses.{name}")
        declared = protocol.get(name)
        assert isinstance(declared, protocol.Analysis) and declared is module.ANALYSIS, name
        assert declared.name == name, name
        assert OmegaConf.load(protocol.CONF / "analysis" / f"{name}.yaml").name == name
        assert isinstance(declared.needs_archive, bool), name
        inspect.signature(declared.run).bind("cfg", "archive", "out")
        inspect.signature(declared.terminal_lines).bind({})
        assert declared.terminal_lines is getattr(module, "terminal_lines", protocol.no_lines), name
    assert [n for n in protocol.NAMES if not protocol.get(n).needs_archive] == ["report"]


def test_sweep_syntax_runs_and_unknown_names_get_one_line(tmp_path):
    res = engine_cli(
        "dump",
        "-m",
        "model=tiny-random,tiny-random",
        "seed=1,2",
        "n_samples=1",
        "max_new_tokens=2",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}/m",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "m").glob("*/logits.h5"))) == 4
    res = engine_cli(
        "dump",
        "-m",
        "model=glob(tiny-*)",
        "n_samples=1",
        "max_new_tokens=2",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}/g",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "g").glob("*/logits.h5"))) == 1
    for bad in ("model=nope", "model=tiny-random,nope", "model=choice(nope)", "model=glob(zz*)"):
        res = engine_cli("dump", "-m", bad, "n_samples=1")
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (bad, res.stderr)
        assert res.stderr.startswith("error: ")


def test_non_editable_install_finds_its_configs(tmp_path):
    """`pip install .` (not editable) ships the configs: dump, then an analysis (whose config
    reads paths/ from engine/conf through Hydra's search path), run from another directory with
    the installed package, not the checkout."""
    site = tmp_path / "site"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (site / "engine" / "conf" / "dump.yaml").is_file()
    assert (site / "analyses" / "conf" / "analyses.yaml").is_file()
    assert (site / "analyses" / "conf" / "analysis" / "entropy.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    code = (
        "import engine, sys; print(engine.__file__); sys.argv = ['engine', 'dump', "
        "'model=tiny-random', 'n_samples=2', 'max_new_tokens=4', 'out=x.h5', "
        "'progress=false']; from engine.__main__ import main; main()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[0].startswith(str(site)), res.stdout
    assert (work / "x.h5").is_file()
    info = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, h5py; f = h5py.File('x.h5'); "
                "print(json.dumps({'complete': int(f.attrs['complete'])}))",
            ],
            cwd=work,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )
    assert info == {"complete": 1}
    code = (
        "import analyses, sys; print(analyses.__file__); sys.argv = ['analyses', "
        "'analysis=entropy', 'archive=x.h5', 'progress=false', 'hydra.run.dir=a']; "
        "from analyses.__main__ import main; main()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[0].startswith(str(site)), res.stdout
    assert "not available" not in res.stderr, res.stderr[-3000:]  # the search path was found
    assert json.loads((work / "a" / "summary.json").read_text())["analysis"] == "entropy"
