"""Analyses at 7B scale without a model: can `entropy` and `pair` read an archive of the
paper's size (200 samples x 128 steps x V = 128,256, two model groups, fp16: about 13 GB)
at the kernels' own speed, in flat memory?

1. Writes the archive through the real writer (`engine.archive.create`, `write_batch`, a
   scored group through `open_scored_group`), rows from `Synth`: LM-shaped logits (Gaussian
   bulk, Zipf head, per-row temperature) and an aligned twin (the base's rows to the power
   1.5 plus noise).
2. Runs `analysis=entropy` and `analysis=pair` on it, each in a fresh process, first with
   the file dropped from the page cache (cold: rows come from the disk), then again at once
   (warm: from the page cache, as far as it holds them), and records every streaming pass the
   analysis makes (`engine.stream.map_rows` / `map_pairs`): rows, bytes, seconds.
3. Replays each pass's own row function on rows held in memory (one block of --mem-rows
   rows): the kernels' throughput with no I/O.  The figure is end-to-end rows/s over that
   in-memory rows/s (same rows, same functions): `ratio`.
4. Reads the file sequentially (cold) for the disk's own rate, and reports each analysis
   process's peak RSS, its RSS over time, and the bytes it read from storage.
5. Deletes the archive, writes the same run as 2 shards, merges them (virtual datasets) and
   repeats 2-4 on the merged archive.  Everything is deleted at the end (--keep keeps it).

    python -m bench.scale                                   # the paper's size (~13 GB, ~15 min)
    python -m bench.scale --prompts 2 --per-prompt 4 --steps 16 --vocab 4096   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, best_of

SEED = 0


# ---- rows without a model ------------------------------------------------------------------
class Synth:
    """Deterministic LM-shaped logit rows: row (sample i, step t) is pool[j] * tau + c with j,
    tau, c hashed from (i, t), so a shard and the single run, or the base and aligned passes,
    get the same rows.  Pool rows: N(0, 2^2) bulk plus a Zipf head (40 tokens, logit
    22 - 1.5 ln r) at random ids; the aligned pool is 1.5 x the base pool plus N(0, 0.5^2)."""

    def __init__(self, vocab: int, pool: int = 64, gamma: float = 1.5):
        rng = np.random.default_rng(SEED)
        base = rng.normal(0.0, 2.0, (pool, vocab)).astype(np.float32)
        head = min(40, vocab)
        for r in range(pool):
            ids = rng.choice(vocab, head, replace=False)
            base[r, ids] = 22.0 - 1.5 * np.log(np.arange(1, head + 1))
        self.pools = {
            "base": base,
            "aligned": (gamma * base + rng.normal(0, 0.5, base.shape)).astype(np.float32),
        }
        self.top = base.argmax(1)

    @staticmethod
    def _hash(i: np.ndarray, t: int) -> np.ndarray:
        x = (i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(
            t * 0xBF58476D1CE4E5B9 % 2**64
        )
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(29))

    def step(self, group: str, samples: np.ndarray, t: int):
        """[batch, vocab] float16 rows and [batch] tokens of step t of these (global) samples."""
        h = self._hash(samples, t)
        pool = self.pools[group]
        j = (h % np.uint64(len(pool))).astype(np.int64)
        tau = 0.6 + 0.8 * ((h >> np.uint64(16)) % np.uint64(1000)).astype(np.float32) / 1000
        c = ((h >> np.uint64(32)) % np.uint64(1000)).astype(np.float32) / 100 - 5
        rows = pool[j] * tau[:, None] + c[:, None]
        return rows.astype(np.float16), self.top[j]


# ---- phase: write ----------------------------------------------------------------------------
def info(key: str, args, role: str):
    from engine.archive import ModelInfo

    prov = {
        "source": "synthetic",
        "name": f"bench.scale {key}",
        "vocab_size": args.vocab,
        "vocab_hash": "synthetic",
        "tokenizer_name": "none",
        "dtype": "float16",
    }
    return ModelInfo(
        key=key,
        provenance=prov,
        vocab_size=args.vocab,
        prompt_text=[f"prompt {p}" for p in range(args.prompts)],
        prompt_tokens=[[1, 2, 3]] * args.prompts,
        vocab_strings=[f"<{i}>" for i in range(args.vocab)],
        tokenizer_json="",
        role=role,
        score_key=None if role == "generator" else "{}",
    )


def write(path: Path, args, shard=None) -> None:
    """One archive (or one shard) with the generator group `base` and the scored `aligned`."""
    from engine import archive
    from engine.archive import Rows
    from engine.runtime.provenance import root_provenance
    from engine.runtime.schedule import batches

    synth, P, M, T = Synth(args.vocab), args.prompts, args.per_prompt, args.steps
    lo, hi = (0, P * M) if shard is None else (shard.start, shard.stop)
    key = {"bench": "scale", "prompts": P, "per_prompt": M, "steps": T, "vocab": args.vocab}

    def steps(group, s0, s1):
        idx = np.arange(s0, s1)
        for t in range(T):
            data, tokens = synth.step(group, idx, t)
            yield Rows(t=t, data=data, tokens=tokens, alive=np.ones(len(idx), bool))

    w = archive.create(
        path,
        run_key=key,
        config_yaml="",
        provenance_root=root_provenance(),
        prompts=[f"prompt {p}" for p in range(P)],
        n_samples=M,
        max_new_tokens=T,
        model=info("base", args, "generator"),
        codec="fp16",
        window=24.0,
        capture_dims={},
        shard=shard,
    )
    with w:
        for _, s0, s1 in batches(P, M, args.batch, lo, hi):
            w.write_batch(s0 - lo, list(range(s0, s1)), steps("base", s0, s1), [args.vocab - 1])
        w.finish()
    mw, _ = archive.open_scored_group(
        path,
        info("aligned", args, "scored"),
        codec="fp16",
        window=24.0,
        resume=False,
        overwrite=False,
    )
    with mw:
        for _, s0, s1 in batches(P, M, args.batch, lo, hi):
            mw.write(s0 - lo, s1 - s0, steps("aligned", s0, s1))
            mw.commit(s1 - lo)
        mw.finish()


def phase_write(args) -> dict:
    from engine.runtime.schedule import shard_of

    out = Path(args.dir)
    t = time.perf_counter()
    if args.shards == 1:
        paths = [out / "single.h5"]
        write(paths[0], args)
    else:
        paths = [out / f"shard{i}" / "logits.h5" for i in range(args.shards)]
        for i, p in enumerate(paths):
            p.parent.mkdir(parents=True, exist_ok=True)
            write(p, args, shard_of(args.prompts, args.per_prompt, args.batch, i, args.shards))
    os.sync()  # the written bytes on disk, so the time counts them
    return {
        "seconds": time.perf_counter() - t,
        "bytes": sum(p.stat().st_size for p in paths),
        "paths": [str(p) for p in paths],
    }


# ---- phase: analysis -------------------------------------------------------------------------
class Passes:
    """Wraps engine.stream's map_rows / map_pairs wherever an analysis imported them, and
    records each pass: its row function, the rows it read, seconds."""

    def __init__(self):
        import engine.stream as S

        self.log = []
        self.orig = {"map_rows": S.map_rows, "map_pairs": S.map_pairs}
        for mod in [
            m for name, m in sys.modules.items() if name.startswith(("analyses.", "engine.stream"))
        ]:
            for name in self.orig:
                if getattr(mod, name, None) is self.orig[name]:
                    setattr(mod, name, self._wrap(name))

    def _wrap(self, name):
        orig = self.orig[name]

        def wrapped(archive, fn, *a, **kw):
            t = time.perf_counter()
            out = orig(archive, fn, *a, **kw)
            groups = [a[0], a[1]] if name == "map_pairs" else [kw.get("key", a[0] if a else None)]
            self.log.append(
                {
                    "kind": name,
                    "fn": fn,
                    "groups": groups,
                    "rows": len(out[1]),
                    "seconds": time.perf_counter() - t,
                    "with_tokens": kw.get("with_tokens", False),
                }
            )
            return out

        return wrapped


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def storage_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def replay(path: str, passes: list, mem_rows: int) -> list[float]:
    """In-memory rows/s of each recorded pass's own function on its first mem_rows rows."""
    from engine.archive import Archive

    with Archive(path) as a:
        T = a.max_new_tokens
        n = max(1, mem_rows // T)
        rows = {k: np.ascontiguousarray(a.model(k).logits[:n].reshape(n * T, -1)) for k in a.models}
        tok = a.samples()["tokens"][:n].reshape(-1)
        gen = a.generator
    speeds = []
    for p in passes:
        g = [k or gen for k in p["groups"]]
        if p["kind"] == "map_pairs":
            call = lambda: p["fn"](rows[g[0]], rows[g[1]], tok)  # noqa: E731
        elif p["with_tokens"]:
            call = lambda: p["fn"](rows[g[0]], tok)  # noqa: E731
        else:
            call = lambda: p["fn"](rows[g[0]])  # noqa: E731
        speeds.append(len(tok) / best_of(call, repeats=2))
    return speeds


def phase_analysis(args) -> dict:
    from hydra import compose, initialize_config_dir

    import analyses.entropy  # noqa: F401  (imported before the wrappers go in)
    import analyses.pair  # noqa: F401
    from analyses.__main__ import run as run_analysis
    from analyses.protocol import CONF
    from engine.archive import Archive

    passes = Passes()
    with Archive(args.archive) as a:
        row_bytes = a.model().vocab_size * a.model().logits.dtype.itemsize
    samples, stop = [], threading.Event()

    def sample_rss():
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, rss_mib()))
            stop.wait(0.25)

    out = Path(args.dir) / f"analysis-{args.analysis}-{Path(args.archive).stem}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "analyses",
            overrides=[
                f"analysis={args.analysis}",
                f"archive={args.archive}",
                f"paths.output_dir={out}",
                "progress=false",
            ],
        )
    base_rss, read0 = rss_mib(), storage_read_bytes()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t = time.perf_counter()
    run_analysis(cfg)
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    read = storage_read_bytes() - read0
    speeds = replay(args.archive, passes.log, args.mem_rows)
    rss = np.array([r for _, r in samples])
    per_pass = [
        {
            "kind": p["kind"],
            "fn": getattr(p["fn"], "__name__", "?"),
            "rows": p["rows"],
            "seconds": p["seconds"],
            "rows_per_s": p["rows"] / p["seconds"],
            "bytes": p["rows"] * row_bytes * (2 if p["kind"] == "map_pairs" else 1),
            "in_memory_rows_per_s": s,
        }
        for p, s in zip(passes.log, speeds)
    ]
    rows = sum(p["rows"] for p in per_pass)
    kernel_s = sum(p["rows"] / p["in_memory_rows_per_s"] for p in per_pass)
    nbytes = sum(p["bytes"] for p in per_pass)
    return {
        "analysis": args.analysis,
        "wall": wall,
        "passes": per_pass,
        "rows": rows,
        "rows_per_s": rows / wall,
        "gb_per_s": nbytes / wall / 1e9,
        "bytes": nbytes,
        "kernel_rows_per_s": rows / kernel_s,
        "ratio": kernel_s / wall,
        "storage_read_bytes": read,
        "rss_start_mib": base_rss,
        "rss_peak_mib": peak,
        "rss_quartiles_mib": np.percentile(rss, [0, 25, 50, 75, 100]).tolist(),
    }


# ---- phase: disk -----------------------------------------------------------------------------
def drop_cache(paths) -> None:
    """Evict files from the page cache (clean pages; the writer's were synced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def phase_disk(args) -> dict:
    drop_cache(args.paths)
    t, n = time.perf_counter(), 0
    for p in args.paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 24):
                n += len(chunk)
    return {"gb_per_s": n / (time.perf_counter() - t) / 1e9, "bytes": n}


# ---- the driver ------------------------------------------------------------------------------
def child(phase: str, args, **extra) -> dict:
    """Run one phase in a fresh process (its own peak RSS, no page-cache or JIT state)."""
    argv = [
        sys.executable,
        "-m",
        "bench.scale",
        "--phase",
        phase,
        "--dir",
        args.dir,
        "--prompts",
        str(args.prompts),
        "--per-prompt",
        str(args.per_prompt),
        "--steps",
        str(args.steps),
        "--vocab",
        str(args.vocab),
        "--batch",
        str(args.batch),
        "--mem-rows",
        str(args.mem_rows),
    ]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench.scale: phase {phase} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(label: str, res: dict, disk: dict) -> list[str]:
    lines = [
        f"  {res['analysis']:8s} on {label}: wall {res['wall']:.1f} s, {res['rows']} rows read "
        f"in {len(res['passes'])} passes = {res['rows_per_s']:.0f} rows/s, "
        f"{res['gb_per_s']:.2f} GB/s",
        f"           kernels in memory on the same rows: {res['kernel_rows_per_s']:.0f} rows/s"
        f" -> end to end at {100 * res['ratio']:.0f}% of kernel throughput "
        f"(disk read alone: {disk['gb_per_s']:.2f} GB/s; this process read "
        f"{res['storage_read_bytes'] / 1e9:.1f} GB from storage)",
        f"           RSS: start {res['rss_start_mib']:.0f} MiB, over the run (min/25/50/75/max) "
        + "/".join(f"{x:.0f}" for x in res["rss_quartiles_mib"])
        + f" MiB, peak {res['rss_peak_mib']:.0f} MiB",
    ]
    for p in res["passes"]:
        lines.append(
            f"           pass {p['kind']}({p['fn']}): {p['rows']} rows in "
            f"{p['seconds']:.1f} s = {p['rows_per_s']:.0f} rows/s "
            f"(in memory {p['in_memory_rows_per_s']:.0f} rows/s)"
        )
    return lines


def drive(args) -> None:
    out = Path(args.dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    free = shutil.disk_usage(out).free
    need = 2 * args.prompts * args.per_prompt * args.steps * args.vocab * 2
    if need * 1.1 > free:
        sys.exit(f"bench.scale: needs {need / 1e9:.1f} GB free under {out}, has {free / 1e9:.1f}")
    print(
        f"bench.scale: {args.prompts} prompts x {args.per_prompt} samples x {args.steps} steps x "
        f"V={args.vocab}, 2 groups, fp16 = {need / 1e9:.2f} GB of logits; under {out}",
        flush=True,
    )
    try:
        for shards in (1, 2):
            w = child("write", args, shards=shards)
            label = "one archive" if shards == 1 else f"{shards} shards merged (virtual)"
            print(
                f"write ({label}): {w['bytes'] / 1e9:.2f} GB in {w['seconds']:.1f} s = "
                f"{w['bytes'] / w['seconds'] / 1e9:.2f} GB/s (through the writer, synced)",
                flush=True,
            )
            path = w["paths"][0]
            if shards > 1:
                from engine.commands.merge import merge

                t = time.perf_counter()
                path = merge(out / "merged.h5", w["paths"], progress=False)["archive"]
                print(
                    f"merge: {time.perf_counter() - t:.1f} s (sha256 of every shard; rows "
                    f"referenced, not copied)",
                    flush=True,
                )
            disk = child("disk", args, paths=w["paths"])
            for analysis in ("entropy", "pair"):
                for cache in ("cold", "warm"):  # warm: right after the cold run
                    if cache == "cold":
                        drop_cache(w["paths"])
                    res = child("analysis", args, archive=path, analysis=analysis)
                    print("\n".join(report(f"{label}, {cache}", res, disk)), flush=True)
            if shards == 1:  # room on the disk for the sharded copy
                Path(path).unlink()
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            print(f"removed {out}")


def size_args(ap: argparse.ArgumentParser) -> None:
    """The archive's size, the paper's by default (200 x 128 steps x 128k vocabulary): shared
    with bench.verify, so both measure the same archive."""
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=25, help="samples per prompt (8 x 25 = 200)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256, help="Llama-3's logit width")
    ap.add_argument("--batch", type=int, default=8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    size_args(ap)
    ap.add_argument(
        "--mem-rows",
        type=int,
        default=1024,
        help="rows held in memory for the kernels' own throughput",
    )
    ap.add_argument("--dir", default=str(ROOT / "outputs" / "bench" / "scale"))
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--phase", choices=("write", "analysis", "disk"), help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--archive", help=argparse.SUPPRESS)
    ap.add_argument("--analysis", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase is None:
        drive(args)
        return
    result = {"write": phase_write, "analysis": phase_analysis, "disk": phase_disk}[args.phase](
        args
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
