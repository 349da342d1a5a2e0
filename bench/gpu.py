"""GPU benchmark: the dump against HF `generate`, host syncs and GPU idle time per step, and
the torch kernels' bandwidth against the device's own.

One process, one loaded model, the same prompts, seeds and batch (EOS disabled, so every
sample runs max_new_tokens):
  hf_generate   transformers `generate(do_sample=True, top_k=0)`, no logits kept
  dump          `engine.commands.dump.run`: hooked loop + encode + pinned copies + writer thread + HDF5
Per step of the dump: host syncs made by the sampling thread (.cpu/.item/.tolist/bool)
and, on CUDA, the GPU's idle fraction (1 - kernel time / wall time, torch profiler).
Kernels: entropy, pair_stats and fit_gamma over [rows, vocab] rows already on the device, in
GB/s of input read, next to a device-to-device copy's GB/s (what the memory delivers here).

    .venv/bin/python -m bench.gpu [--model smollm2-135m-instruct | --shape7b] [--device cuda]

--shape7b: a tiny-random Llama shaped like a 7B model where it costs (hidden 4096, 2 layers,
vocabulary 151936, bf16 on CUDA): what one step's unembedding, logits and copies cost at 7B.
Runs on the CPU too (small sizes), so it stays runnable without a GPU; results under docs/.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import best_of
from bench.dump_overhead import compose_cfg
from engine.commands import dump as dump_mod
from engine.runtime import run as run_mod
from engine.runtime.models import (
    LoadedModel,
    load_model,
    resolve_device,
    tiny_random_tokenizer,
    wrap,
)
from engine.runtime.prompts import render
from engine.runtime.settings import ModelSpec

SYNC_CALLS = ("cpu", "item", "tolist", "__bool__")  # .numpy() needs a host tensor already


def shape7b(dev: torch.device) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_random_tokenizer()
    cfg = LlamaConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    prov = {
        "source": "tiny-random",
        "name": "shape7b",
        "revision": "seed=0",
        "weights_sha256": "",
        "dtype": str(dtype).removeprefix("torch."),
    }
    return wrap(model, tok, "shape7b", "shape7b", dev, prov)


class SyncCounter:
    """Counts calls that wait for the device, made by one thread."""

    def __init__(self):
        self.n, self.on, self.thread = 0, False, threading.get_ident()
        self._real = {}
        self._check = run_mod.self_check

    def __enter__(self):
        for name in SYNC_CALLS:
            real = self._real[name] = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **kw):
                if self.on and threading.get_ident() == self.thread:
                    self.n += 1
                return _real(t, *a, **kw)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(torch.Tensor, name, real)
        run_mod.self_check = self._check

    def decode_only(self) -> SyncCounter:
        """Do not count the run's self-check (one teacher-forced forward per run, after the
        first batch): what is measured is the decode loop's syncs per step."""
        self._check = real = run_mod.self_check

        def quiet(*a, **kw):
            on, self.on = self.on, False
            try:
                return real(*a, **kw)
            finally:
                self.on = on

        run_mod.self_check = quiet
        return self


def gpu_busy_fraction(fn) -> float | None:
    """Kernel time / wall time of fn() on CUDA (None elsewhere)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return min(1.0, busy / wall)


def kernel_bandwidth(dev: torch.device, rows: int, vocab: int) -> list[tuple[str, float]]:
    import kernels as K

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(rows, vocab, device=dev) * 3
    q = 1.3 * x + 0.2 * torch.randn_like(x)
    tok = torch.randint(0, vocab, (rows,), device=dev)
    xb = x.bfloat16()
    out = []
    for name, fn, nbytes in [
        ("d2d copy (memory)", lambda: torch.empty_like(x).copy_(x), 2 * x.nbytes),
        ("entropy fp32", lambda: K.entropy(x), x.nbytes),
        ("entropy bf16", lambda: K.entropy(xb), x.nbytes // 2),
        ("pair_stats fp32", lambda: K.pair_stats(x, q, tok), 2 * x.nbytes),
        ("fit_gamma fp32", lambda: K.fit_gamma(x, q), 2 * x.nbytes),
    ]:

        def run(fn=fn):
            fn()
            sync()

        out.append((name, nbytes / best_of(run, 3) / 1e9))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shape7b", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--kernel-rows", type=int, default=64)
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    print(
        f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmpd:
        out = Path(tmpd) / "bench.h5"
        args.model = "tiny-random" if args.shape7b else args.model
        cfg = compose_cfg(out, args, [f"device={dev}", "prompts=grace_hopper"])
        lm = (
            shape7b(dev)
            if args.shape7b
            else load_model(ModelSpec.from_node(cfg.model), str(dev), cfg.paths.cache_dir)
        )
        lm.eos_ids = ()
        ids = torch.tensor([render(lm.tokenizer, cfg.prompts.texts[0], False)[1]], device=dev)
        tokens = args.n_samples * args.max_new_tokens

        def run_hf():
            torch.manual_seed(0)
            hf = lm.bridge.original_model
            for _ in range(0, args.n_samples, args.batch_size):
                b = ids.expand(min(args.batch_size, args.n_samples), -1)
                hf.generate(
                    b,
                    attention_mask=torch.ones_like(b),
                    do_sample=True,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens,
                    pad_token_id=0,
                )
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def run_dump():
            dump_mod.run(cfg, model=lm)

        t_hf = best_of(run_hf, 2)
        t_dump = best_of(run_dump, 2)
        with SyncCounter().decode_only() as sc:
            sc.on = True
            run_dump()
            sc.on = False
        busy = gpu_busy_fraction(run_dump)
        print(
            f"\ndump vs HF generate: {args.n_samples} samples x {args.max_new_tokens} steps, "
            f"batch {args.batch_size}, codec {args.codec}, V = {lm.vocab_size}"
        )
        print(f"  hf_generate   {tokens / t_hf:10.0f} tokens/s")
        print(f"  dump          {tokens / t_dump:10.0f} tokens/s   ratio {t_hf / t_dump:.2f}")
        steps = -(-args.n_samples // args.batch_size) * args.max_new_tokens
        print(
            f"  host syncs per step (sampling thread): {sc.n / steps:.2f} (the run's one "
            f"self-check forward not counted)"
        )
        if busy is not None:
            print(f"  GPU idle fraction during the dump: {1 - busy:.2f}")
    print(f"\ntorch kernels over [{args.kernel_rows}, {lm.vocab_size}] rows on {dev}:")
    for name, gbs in kernel_bandwidth(dev, args.kernel_rows, lm.vocab_size):
        print(f"  {name:<20} {gbs:9.2f} GB/s")


if __name__ == "__main__":
    main()
