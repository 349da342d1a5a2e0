"""Teacher forcing: a model's distribution at every stored step of given completions, from one
forward over prompt + completion per batch (what `score` and `answers` store, and what the
self-check recomputes one sample of).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.runtime.sampling import NonFiniteLogits, Step, forward_logits


def teacher_forced_steps(
    bridge, prompt_ids, tokens: np.ndarray, length: np.ndarray, device, capture=()
):
    """Steps [t] of a batch from one forward over prompt + completion: row t is the
    distribution at the position that predicted stored token t.  Full-vocabulary logits are
    computed only there (the last L + 1 positions), not over the prompt.  `capture`: hook
    points whose activations at the same positions go into each step's `acts`."""
    n = len(tokens)
    L = int(length.max(initial=0))
    if L == 0:
        return
    comp = np.where(tokens[:, :L] >= 0, tokens[:, :L], 0)  # right padding never reaches
    ids = torch.tensor(
        np.concatenate([np.tile(prompt_ids, (n, 1)), comp], 1),  # earlier rows
        dtype=torch.long,
        device=device,
    )  # [batch, pos]
    acts: dict = {}
    if capture:
        logits, acts = forward_logits(bridge, ids, keep=L + 1, capture=list(capture))
    else:
        logits = forward_logits(bridge, ids, keep=L + 1)  # [batch, L + 1, vocab] from pos P - 1
    finite = torch.isfinite(logits.amax(dim=-1)).cpu().numpy()  # [batch, L + 1]: one sync
    for t in range(L):
        alive = t < length
        bad = alive & ~finite[:, t]
        if bad.any():
            raise NonFiniteLogits(np.flatnonzero(bad).tolist(), t)
        step_acts = {k: a[:, t] for k, a in acts.items()}
        yield Step(t, logits[:, t], step_acts, comp[:, t].astype(np.int64), alive)
