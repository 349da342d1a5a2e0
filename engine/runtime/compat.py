"""Adapters between the libraries whose internals the engine meets, each applied only where
the installed versions need it and checked at run time by the invariants that would catch it
(`engine.runtime.sampling.check_cache`, `engine.runtime.selfcheck`).

transformers 5.24 renamed the KV cache keyword from `past_key_values` to `cache`, on the
model's forward and on every decoder layer's call of its attention module.  TransformerLens
4.3's attention bridge (`AttentionBridge._update_kv_cache`,
transformer_lens/model_bridge/generalized_components/attention.py) reads only
`past_key_values` (or `layer_past`) from those keyword arguments, so under 5.24 it never
extends the cache and every decoded token attends to itself alone.  `bridge_cache_keyword`
lets it find the cache under the new name too (it changes nothing where `past_key_values` is
given, so it is harmless once a TransformerLens release reads `cache` itself).  Not covered:
attention bridges that read the cache themselves (TransformerLens's MLA and GLM-DSA
attention); for those `check_cache` stops the run at its first step.
"""

from __future__ import annotations

import functools

_MARK = "_engine_reads_cache_keyword"


def bridge_cache_keyword() -> bool:
    """Make the attention bridge read the KV cache passed as `cache=`; True if it had to."""
    from transformer_lens.model_bridge.generalized_components import attention

    cls = attention.AttentionBridge
    orig = cls._update_kv_cache
    if getattr(orig, _MARK, False):
        return False

    @functools.wraps(orig)
    def update(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return orig(self, k, v, **kwargs)

    setattr(update, _MARK, True)
    cls._update_kv_cache = update
    return True
