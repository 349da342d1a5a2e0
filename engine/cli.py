"""Shared entry-point behaviour: user errors become one line on stderr and exit status 2; the
sample-list syntax of the plain-argument verbs."""

from __future__ import annotations

import contextlib
import re
import sys

from omegaconf.errors import OmegaConfBaseException

from engine.errors import EngineError, interrupt_advice, on_interrupt


@contextlib.contextmanager
def user_errors():
    on_interrupt(None)
    try:
        yield
    except (EngineError, OmegaConfBaseException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        advice = interrupt_advice() or "nothing was written"
        print(f"error: interrupted; {advice}", file=sys.stderr)
        sys.exit(130)


def check_group_choices(args: list[str], groups: tuple[str, ...], options=None) -> None:
    """Exit with one line when a `group=option` override names no conf/<group>/<option>.yaml
    (Hydra would print a multi-line report).  Overrides are read with Hydra's own parser, so
    sweeps (`a,b`, `choice(a,b)`, `glob(*)`) are checked option by option; syntax errors are
    left to Hydra.  `options(group)`: a config tree's choices (default: engine/conf's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    if options is None:
        from engine.config import options

    parser = OverridesParser.create()
    for arg in args:
        name, eq, _ = arg.partition("=")
        group = name.lstrip("+~")
        if not eq or group not in groups:
            continue
        try:
            ov = parser.parse_override(arg)
        except Exception:  # Hydra reports its own syntax errors
            continue
        available, value = options(group), ov.value()
        if isinstance(value, Glob):
            if not value.filter(available):
                _die(
                    f"no {group} matches {arg.partition('=')[2]}; available: {', '.join(available)}"
                )
            continue
        values = (
            list(ov.sweep_string_iterator())
            if ov.is_sweep_override()
            else [ov.get_value_element_as_str()]
        )
        bad = [v for v in values if v not in available]
        if bad:
            _die(f"unknown {group} {bad[0]!r}; available: {', '.join(available)}")


#: launcher option (conf/hydra/launcher/ or Hydra's own names) -> (plugin module, PyPI package)
LAUNCHERS = {
    "local": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm_gpu": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}


def check_launcher(args: list[str], find_spec=None) -> None:
    """One line naming the package when `hydra/launcher=X` needs a plugin that is missing
    (Hydra would report an unknown config group option)."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    for arg in args:
        if not arg.startswith("hydra/launcher="):
            continue
        name = arg.partition("=")[2]
        module, package = LAUNCHERS.get(
            name.split("_")[0] if name.startswith("ray") else name, (None, None)
        )
        if module and find_spec(module) is None:
            _die(
                f"hydra/launcher={name} needs the package {package} "
                f"(.venv/bin/pip install {package}"
                + (
                    ""
                    if package == "hydra-ray-launcher"
                    else ", or the launchers extra: pip install 'logit-engine[launchers]'"
                )
                + ")"
            )


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_samples(spec: str, n: int, flag: str = "--samples") -> list[int]:
    """Sample indices from a list like `0,3,10-20` (ranges inclusive; inspect's plain `0,8`
    is the same syntax), sorted and without repeats; each must be within 0..n-1."""
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise EngineError(
                f"{flag} {spec!r}: {part!r} is neither a sample index nor a range like 10-20"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise EngineError(f"{flag} {spec!r}: range {part} runs backwards")
        if hi >= n:
            raise EngineError(f"{flag} {spec!r}: sample {hi} out of range (0..{n - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)
