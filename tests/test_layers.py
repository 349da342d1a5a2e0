"""The package's shape: layer contracts, torch-free reading, configs that install and compose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

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


def test_import_linter_contracts_hold():
    """.importlinter: kernels import nothing of the project; the archive package imports
    neither torch nor the run layer; analyses never import model sources or runs; analyses
    above stream, stream above the archive package, kernels lowest."""
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


def _run_without_torch(module: str, argv: list[str], tmp_path) -> str:
    res = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv, module=module)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_inspect_verify_and_entropy_analysis_never_import_torch(tiny_archive, tmp_path):
    out = _run_without_torch("engine", ["engine", "inspect", str(tiny_archive), "--render",
                                        "--limit", "1"], tmp_path)
    assert "TORCH_LOADED=False" in out, out[-2000:]
    out = _run_without_torch("engine", ["engine", "verify", str(tiny_archive), "--no-progress"],
                             tmp_path)
    assert "TORCH_LOADED=False" in out and "all match" in out, out[-2000:]
    out = _run_without_torch("analyses", ["analyses", "analysis=entropy", f"archive={tiny_archive}",
                                          "progress=false", f"hydra.run.dir={tmp_path}/a"], tmp_path)
    assert "TORCH_LOADED=False" in out, out[-2000:]


GROUP_PRIMARY = {"model": "dump", "prompts": "dump", "paths": "dump", "run": "dump",
                 "sampling": "dump", "analysis": "analyses", "candidates": "answers"}
PRIMARY = ("dump", "score", "perturb", "align", "answers", "analyses")


def test_every_option_of_every_config_group_composes(tmp_path):
    groups = [p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"
              and not p.name.startswith("__")]
    assert set(groups) == set(GROUP_PRIMARY), "a new config group needs a primary config here"
    n = 0
    for group in groups:
        for option in options(group):
            # mandatory values (`???`, e.g. model=hf's name) get a placeholder, as a user gives one
            raw = OmegaConf.load(CONF / group / f"{option}.yaml")
            given = [f"{group}.{k}=probe" for k in raw.keys() if OmegaConf.is_missing(raw, k)]
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(GROUP_PRIMARY[group], overrides=[f"{group}={option}", *given,
                                                               f"paths.output_dir={tmp_path}"])
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            assert plain, (group, option)
            n += 1
    for primary in PRIMARY:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(primary, overrides=[f"paths.output_dir={tmp_path}"])
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert n >= 25


def test_sweep_syntax_runs_and_unknown_names_get_one_line(tmp_path):
    res = engine_cli("dump", "-m", "model=tiny-random,tiny-random", "seed=1,2", "n_samples=1",
                     "max_new_tokens=2", "progress=false", f"hydra.sweep.dir={tmp_path}/m")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "m").glob("*/logits.h5"))) == 4
    res = engine_cli("dump", "-m", "model=glob(tiny-*)", "n_samples=1", "max_new_tokens=2",
                     "progress=false", f"hydra.sweep.dir={tmp_path}/g")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "g").glob("*/logits.h5"))) == 1
    for bad in ("model=nope", "model=tiny-random,nope", "model=choice(nope)", "model=glob(zz*)"):
        res = engine_cli("dump", "-m", bad, "n_samples=1")
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (bad, res.stderr)
        assert res.stderr.startswith("error: ")


def test_non_editable_install_finds_its_configs(tmp_path):
    """`pip install .` (not editable) ships the configs: dump runs from another directory
    with the installed package, not the checkout."""
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(site), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (site / "engine" / "conf" / "dump.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    code = ("import engine, sys; print(engine.__file__); sys.argv = ['engine', 'dump', "
            "'model=tiny-random', 'n_samples=2', 'max_new_tokens=4', 'out=x.h5', "
            "'progress=false']; from engine.__main__ import main; main()")
    res = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[0].startswith(str(site)), res.stdout
    assert (work / "x.h5").is_file()
    info = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, h5py; f = h5py.File('x.h5'); "
         "print(json.dumps({'complete': int(f.attrs['complete'])}))"],
        cwd=work, capture_output=True, text=True, env=env).stdout)
    assert info == {"complete": 1}
