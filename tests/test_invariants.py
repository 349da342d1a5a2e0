"""The run checks its own invariants: the KV cache advances with every decoded token, and the
first committed batch matches a teacher-forced forward within the codec's bound.

Each failure is planted: a cache that keeps the prompt but forgets every decoded token (the
rows then have no context, as with transformers 5.24 under TransformerLens 4.3), a cache that
never fills (a release that ignores the cache handed in), and stored rows that are not the
model's.  The run must stop with one line, keep its partial and rename nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.errors import EngineError
from engine.runtime import sampling, selfcheck
from engine.runtime.settings import ModelSpec
from kernels.reference import log_softmax


class Forgetful(DynamicCache):
    """Keeps the prompt's keys and values, drops every decoded token's: attention at each
    step then sees the prompt and the current token only."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx >= len(self.layers) or self.get_seq_length(layer_idx) == 0:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        return (
            torch.cat([layer.keys, key_states], -2),
            torch.cat([layer.values, value_states], -2),
        )


class Empty(DynamicCache):
    """Never stores anything: what a model does with a cache it does not read."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".h5", ".partial"))


def test_a_cache_that_forgets_decoded_tokens_stops_the_dump_at_step_1(
    dump_cfg, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        sampling, "new_cache", lambda bridge: Forgetful(config=bridge.original_model.config)
    )
    cfg = dump_cfg("n_samples=2", "max_new_tokens=8", "out=" + str(tmp_path / "a.h5"))
    with pytest.raises(EngineError) as err:
        dump_mod.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "KV cache holds" in msg and "after step 1, expected" in msg
    assert "transformers 5." in msg and "transformer-lens 4." in msg
    assert not (tmp_path / "a.h5").exists()  # nothing renamed


def test_a_cache_the_model_never_fills_stops_the_dump_before_the_first_row(
    dump_cfg, tmp_path, monkeypatch
):
    """The mocked stale cache of a release whose model ignores the cache it is handed."""
    monkeypatch.setattr(
        sampling, "new_cache", lambda bridge: Empty(config=bridge.original_model.config)
    )
    cfg = dump_cfg("n_samples=2", "max_new_tokens=8", "out=" + str(tmp_path / "a.h5"))
    with pytest.raises(EngineError, match=r"holds 0 positions after step 0"):
        dump_mod.run(cfg)
    assert not (tmp_path / "a.h5").exists()


def test_without_the_cache_check_the_self_check_still_refuses_context_free_rows(
    dump_cfg, tmp_path, monkeypatch
):
    """Second layer: with the cache check switched off, the context-free rows are written,
    and the self-check after the first batch stops the run; the partial stays, with the
    measured difference recorded in its model group."""
    monkeypatch.setattr(
        sampling, "new_cache", lambda bridge: Forgetful(config=bridge.original_model.config)
    )
    monkeypatch.setattr(sampling, "check_cache", lambda *a: None)
    out = tmp_path / "a.h5"
    cfg = dump_cfg("n_samples=2", "max_new_tokens=8", "codec=q16", f"out={out}")
    with pytest.raises(EngineError, match="self-check failed") as err:
        dump_mod.run(cfg)
    assert "\n" not in str(err.value)
    assert not out.exists()
    partial = tmp_path / "a.h5.partial"
    assert partial.exists()  # kept for inspection
    with Archive(partial, allow_partial=True) as a:
        c = a.model().self_check
    assert c is not None and c["max_abs_diff"] > c["bound"] and c["steps"] >= 2


def test_a_good_dump_records_its_self_check_within_the_bound(dump_cfg, tmp_path):
    res = dump_mod.run(dump_cfg("n_samples=3", "batch_size=2", "max_new_tokens=10", "codec=fp16"))
    with Archive(res["archive"]) as a:
        c = a.model().self_check
        length = a.samples()["length"]
    assert c is not None and 0 <= c["max_abs_diff"] <= c["bound"]
    assert c["sample"] == int(np.argmax(length[:2]))  # the longest of the first batch
    assert c["steps"] == int(length[c["sample"]])
    assert res["self_check"]["max_abs_diff"] == pytest.approx(c["max_abs_diff"])


def test_stored_rows_that_are_not_the_models_fail_the_self_check(dump_cfg, tmp_path, monkeypatch):
    """Rows scaled by 1.05 on their way to the writer (every log-prob gap off by 5%)."""
    from engine.runtime import overlap

    real = overlap.encode

    def skewed(codec, logits, window):
        return real(codec, logits * 1.05, window)

    monkeypatch.setattr(overlap, "encode", skewed)
    cfg = dump_cfg("n_samples=2", "max_new_tokens=6", "codec=fp32", "out=" + str(tmp_path / "a.h5"))
    with pytest.raises(EngineError, match="self-check failed"):
        dump_mod.run(cfg)
    assert not (tmp_path / "a.h5").exists() and (tmp_path / "a.h5.partial").exists()


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "q16"])
def test_the_bound_covers_each_codec_and_is_tight(codec):
    """Rows [64, 4096] of logits with |x| <= 16 through the real encoder and decoder: the
    measured |Δ log p| (float64 reference) lies within the bound with no rounding allowance,
    and the bound is within 8x of what the codec really does (not a blanket tolerance)."""
    from engine.archive import codecs
    from engine.runtime.encode import encode, to_numpy

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 4096, generator=g, dtype=torch.float64) * 32 - 16).float()
    data, scale, offset = encode(codec, x, 24.0)
    dec = codecs.decode(
        codec,
        to_numpy(codec, data),
        None if scale is None else scale.numpy(),
        None if offset is None else offset.numpy(),
    ).astype(np.float64)
    stored = dec if codec == "q16" else log_softmax(dec)
    forced = log_softmax(x.double().numpy())
    floor = offset.double().numpy() if codec == "q16" else None  # clamped at the window
    measured = selfcheck.max_abs_diff(stored, forced, floor)
    b = selfcheck.bound(codec, 24.0, 16.0, "float32") - selfcheck.ROUNDING["float32"] * 16
    assert measured <= b
    if codec != "fp32":
        assert b < 8 * measured


def test_the_bridge_reads_a_cache_passed_under_its_new_name(dump_cfg, monkeypatch):
    """transformers 5.24's decoder layers hand the attention module `cache=`; TransformerLens
    4.3's attention bridge reads only `past_key_values`.  With the adapter it extends a cache
    passed as `cache=` exactly as one passed as `past_key_values=` (checked on the locked
    release by calling the bridge's update the way 5.24's layers do)."""
    from transformer_lens.model_bridge.generalized_components import attention

    from engine.runtime import compat
    from engine.runtime.models import load_model

    lm = load_model(ModelSpec.from_node(dump_cfg().model), "cpu")
    bridge_attn = next(m for m in lm.bridge.modules() if isinstance(m, attention.AttentionBridge))
    k = v = torch.zeros(1, 2, 3, 8)

    def grows(**kw):
        cache = DynamicCache(config=lm.bridge.original_model.config)
        bridge_attn._update_kv_cache(k, v, **{name: cache for name in kw})
        return cache.get_seq_length(getattr(bridge_attn, "_layer_idx", 0) or 0)

    current = attention.AttentionBridge._update_kv_cache  # adapted already where a model of
    original = getattr(current, "__wrapped__", current)  # transformers >= 5.24 was loaded
    monkeypatch.setattr(attention.AttentionBridge, "_update_kv_cache", original)  # restored after
    assert grows(past_key_values=1) == 3
    before = grows(cache=1)  # 0 on TransformerLens 4.3: `cache=` is ignored ...
    assert compat.bridge_cache_keyword() is True
    assert grows(cache=1) == 3  # ... and read through the adapter
    assert compat.bridge_cache_keyword() is False  # applied once
    assert grows(past_key_values=1) == 3  # the old name still works
    assert before in (0, 3)
