"""The logit lens's reductions: per [row, layer] statistics of a model's intermediate
distributions, and two models' lenses compared layer by layer.  Arrays in, arrays out; numpy
(numba) or torch like every kernel, composed of the row kernels of `kernels.api`.

Logit lens (nostalgebraist 2020): layer l's distribution is softmax(unembed(final_norm(
resid_l))).  KL(final || lens_l) is tuned-lens's `forward_kl` (Belrose et al. 2023,
`PredictionTrajectory.forward_kl`: sum p_final (log p_final - log p_lens)).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels._dispatch import is_torch
from kernels.api import entropy, fit_gamma, log_softmax, pair_stats


class LensStats(NamedTuple):
    entropy: object  # [row, layer] H(lens_l), nats
    kl_final: object  # [row, layer] KL(final || lens_l), nats
    logp_token: object  # [row, layer] log lens_l(token), nats
    rank_final_top: object  # [row, layer] rank (1 = top) under lens_l of the final's argmax
    topk_ids: object  # [row, layer, k] lens_l's k most probable ids, most probable first
    topk_logp: object  # [row, layer, k] their log-probabilities


class LayerPairStats(NamedTuple):
    kl_base_aligned: object  # [row, pair] KL(base_l || aligned_l), nats
    kl_aligned_base: object  # [row, pair] KL(aligned_l || base_l), nats
    js: object  # [row, pair] Jensen-Shannon divergence, nats
    gamma: object  # [row, pair] argmin_g KL(aligned_l || softmax(g log base_l)); NaN: unidentified
    kl_at_gamma: object  # [row, pair] KL at gamma


def _expand(x, layers):
    """[row, ...] -> [layer, row, ...] without copying."""
    if is_torch(x):
        return x.unsqueeze(0).expand(layers, *x.shape)
    return np.broadcast_to(x, (layers, *np.shape(x)))


def _swap(x):
    """[layer, row, ...] -> [row, layer, ...]"""
    return x.transpose(0, 1) if is_torch(x) else np.swapaxes(x, 0, 1)


def _topk(logp, k):
    """The k largest entries of the last axis, largest first: (ids, values)."""
    if is_torch(logp):
        v, i = logp.topk(k, dim=-1)
        return i.int(), v
    i = np.argpartition(-logp, k - 1, axis=-1)[..., :k]
    v = np.take_along_axis(logp, i, -1)
    order = np.argsort(-v, axis=-1, kind="stable")
    return np.take_along_axis(i, order, -1).astype(np.int32), np.take_along_axis(v, order, -1)


def lens_stats(final, lens, tokens, k: int) -> LensStats:
    """Statistics of the lens distributions `lens` [layer, row, vocab] (raw logits) against
    the model's own output `final` [row, vocab] and the tokens [row] that followed.  Outputs
    are row-major ([row, layer], [row, layer, k]): a step's rows of every layer together, as
    the archive stores them.  KL(final || lens_l) is clamped at 0 (float rounding can make an
    identical row's KL -1e-8)."""
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if is_torch(lens):
        return _lens_stats_torch(final, lens, tokens, min(int(k), lens.shape[-1]))
    n_layers = lens.shape[0]
    fin = _expand(final, n_layers)
    tok = _expand(tokens, n_layers)
    ps = pair_stats(lens, fin, tok)  # p = lens_l, q = final
    kl = ps.kl_qp.clamp(min=0) if is_torch(ps.kl_qp) else np.maximum(ps.kl_qp, 0)
    rank = ps.q_top_rank_in_p  # rank under lens_l of the final's most probable token
    ids, logp = _topk(log_softmax(lens), min(int(k), lens.shape[-1]))
    h = entropy(lens)
    if is_torch(h):
        rank = rank.int()
        h, kl, lp = h.float(), kl.float(), ps.logp_token.float()
    else:
        rank = rank.astype(np.int32)
        h, kl, lp = h.astype(np.float32), kl.astype(np.float32), ps.logp_token.astype(np.float32)
    return LensStats(_swap(h), _swap(kl), _swap(lp), _swap(rank), _swap(ids), _swap(logp))


def _lens_stats_torch(final, lens, tokens, k: int) -> LensStats:
    """`lens_stats` for tensors (the run-time path, on the model's device): whole-array torch
    in float32, one log-softmax of the lens rows shared by every statistic (the row kernels of
    `kernels.api` would take one pass each; 5x slower on the CPU for 30 layers x 49k)."""
    import torch

    lens, final = lens.float(), final.float()
    L, n, _ = lens.shape
    lp = torch.log_softmax(lens, -1)  # [layer, row, vocab]
    lq = torch.log_softmax(final, -1)  # [row, vocab]
    p, q = lp.exp(), lq.exp()
    h = -torch.where(p > 0, p * lp, 0).sum(-1)
    kl = torch.where(q > 0, q * (lq - lp), 0).sum(-1).clamp(min=0)
    tok = tokens.long().to(lens.device)[None, :, None].expand(L, n, 1)
    logp_token = lp.gather(-1, tok)[..., 0]
    top = final.argmax(-1)[None, :, None].expand(L, n, 1)  # the final's most probable token
    rank = 1 + (lens > lens.gather(-1, top)).sum(-1)
    v, i = lp.topk(k, dim=-1)
    return LensStats(*(_swap(x) for x in (h, kl, logp_token, rank.int(), i.int(), v)))


def layer_pair_stats(base, aligned) -> LayerPairStats:
    """Two models' lens distributions on identical contexts, [pair, row, vocab] each (pair j:
    the layers compared), reduced per [row, pair]: both KLs, JS, and the per-row power
    gamma = argmin KL(aligned || softmax(gamma log base)) of `kernels.fit_gamma`.  CPU tensors
    go through the numba kernels (4x faster there than torch's; same semantics, both checked
    against `kernels.reference`) and come back as tensors."""
    if is_torch(base) and base.device.type == "cpu":
        import torch

        out = layer_pair_stats(
            base.detach().contiguous().numpy(), aligned.detach().contiguous().numpy()
        )
        return LayerPairStats(*(torch.from_numpy(np.ascontiguousarray(x)) for x in out))
    ps = pair_stats(base, aligned)
    fit = fit_gamma(base, aligned)
    cols = (ps.kl_pq, ps.kl_qp, ps.js, fit.gamma, fit.kl)
    if is_torch(ps.kl_pq):
        return LayerPairStats(*(_swap(c).float() for c in cols))
    return LayerPairStats(*(_swap(c).astype(np.float32) for c in cols))
