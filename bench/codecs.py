"""Codec error and size on real logits: SmolLM2-135M-Instruct rows stored as fp32, re-encoded
with every codec and compared with the fp32 truth (float64 arithmetic).

Reported per codec: bytes per vocabulary row, max |error| of decoded logits (log-probs for
q16, compared with the true log-probs), and the distributional damage KL(p_true || p_decoded)
(mean and max over rows), plus the largest change of entropy.

    .venv/bin/python -m bench.codecs [--archive A.h5 (fp32 codec)] [--rows 1024]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import real_archive
from engine.archive import Archive, codecs
from engine.runtime.encode import encode, to_numpy
from kernels import reference as R


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path)
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args()
    path = args.archive or real_archive(
        "smollm2-fp32.h5", "n_samples=4", "codec=fp32", "max_new_tokens=64"
    )
    with Archive(path) as a:
        if a.model().codec != "fp32":
            raise SystemExit("need an fp32 archive as the truth")
        x = np.concatenate([b.raw for b in a.iter_rows()])[: args.rows].astype(np.float64)
    lp = R.log_softmax(x)
    h = R.entropy(x)
    print(f"{len(x)} real rows, vocab {x.shape[1]}, logits in [{x.min():.1f}, {x.max():.1f}]")
    print(
        f"{'codec':<6}{'bytes/row':>11}{'max |err|':>12}{'documented':>12}{'mean KL':>11}"
        f"{'max KL':>11}{'max |dH|':>11}"
    )
    for codec in ("fp32", "fp16", "bf16", "q16"):
        data, scale, offset = encode(codec, torch.from_numpy(x).float())
        dec = codecs.decode(
            codec,
            to_numpy(codec, data),
            None if scale is None else scale.numpy(),
            None if offset is None else offset.numpy(),
        ).astype(np.float64)
        truth = lp if codec == "q16" else x.astype(np.float32).astype(np.float64)
        inside = truth >= (offset.numpy()[:, None] if codec == "q16" else -np.inf)
        err = np.abs(dec - truth)[inside].max()
        bound = codecs.worst_case_error(codec, float(np.abs(truth[inside]).max()))
        kl = R.pair_stats(x, dec)[0]
        dh = np.abs(R.entropy(dec) - h).max()
        row_bytes = x.shape[1] * np.dtype(codecs.STORAGE_DTYPE[codec]).itemsize + (
            8 if codec == "q16" else 0
        )
        print(
            f"{codec:<6}{row_bytes:>11}{err:>12.2e}{bound:>12.2e}{kl.mean():>11.2e}"
            f"{kl.max():>11.2e}{dh:>11.2e}"
        )


if __name__ == "__main__":
    main()
