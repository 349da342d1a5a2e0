"""Real model tier: SmolLM2-135M-Instruct from the packaged GGUF (dequantized once per
session into the cache), checked against a plain HuggingFace forward on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.errors import EngineError
from engine.runtime import models
from engine.runtime.settings import ModelSpec
from tests.conftest import DEVICE, compose_dump

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_archive(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("smol")
    cfg = compose_dump(
        tmp,
        cache_dir,
        ["n_samples=2", "batch_size=2", "max_new_tokens=16", "codec=fp32", "prompts=grace_hopper"],
    )
    return Path(dump_mod.run(cfg)["archive"])


def test_second_load_reads_the_cache_not_the_gguf(smol_archive, cache_dir, monkeypatch):
    seen = []
    real = models._load_hf

    def spy(name_or_dir, revision, dtype, gguf_file=None, device_map=None):
        seen.append(gguf_file)
        return real(name_or_dir, revision, dtype, gguf_file, device_map)

    monkeypatch.setattr(models, "_load_hf", spy)
    mcfg = OmegaConf.load(Path(dump_mod.CONF) / "model" / "smollm2-135m-instruct.yaml")
    lm = models.load_model(ModelSpec.from_node(mcfg), DEVICE, cache_dir)
    assert seen == [None], "the cached safetensors directory must be used"
    assert lm.vocab_size == 49152 and lm.provenance["weights_sha256"]
    assert list(Path(cache_dir).glob("SmolLM2-135M-Instruct.Q4_1-*-float32/model.safetensors"))


def test_smollm2_logits_equal_hf_forward(smol_archive, cache_dir):
    from transformers import AutoModelForCausalLM

    hf_dir = next(Path(cache_dir).glob("SmolLM2-135M-Instruct.Q4_1-*"))
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with Archive(smol_archive) as a:
        s, m = a.samples(), a.model()
        assert m.provenance["source"] == "smollm2" and m.vocab_size == 49152
        for i in range(a.n_samples):
            n = int(s["length"][i])
            prompt = list(m.group["prompt_tokens"][int(s["prompt_index"][i])])
            ids = torch.tensor([prompt + list(s["tokens"][i, :n])])
            with torch.no_grad():
                ref = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + n].double().numpy()
            got = m.rows(i, slice(0, n)).astype(np.float64)
            diff = np.abs(got - ref).max()
            assert diff < 2e-3, f"sample {i}: max_diff={diff}"  # KV cache vs full forward
            # greedy choices agree exactly
            assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_chat_template_is_recorded(tmp_path, cache_dir):
    cfg = compose_dump(
        tmp_path,
        cache_dir,
        ["n_samples=1", "max_new_tokens=2", "prompts=grace_hopper", "chat_template=true"],
    )
    with Archive(dump_mod.run(cfg)["archive"]) as a:
        seen = a.model().group["prompt_text"].asstr()[0]
    assert "<|im_start|>user\nGrace Hopper was<|im_end|>" in seen
    assert seen.rstrip().endswith("<|im_start|>assistant")


def test_scoring_smollm2_on_a_tiny_random_archive_is_refused(tiny_archive, tmp_path, cache_dir):
    """A real tokenizer mismatch (49152-token BPE vs 258-token bytes): one clear refusal."""
    from engine.commands import score as score_mod
    from tests.test_pairs import compose_cfg

    before = tiny_archive.read_bytes()
    cfg = compose_cfg(
        "score", tmp_path, cache_dir, [f"archive={tiny_archive}", "model=smollm2-135m-instruct"]
    )
    with pytest.raises(EngineError, match="tokenizer mismatch"):
        score_mod.run(cfg)
    assert tiny_archive.read_bytes() == before


def test_raw_prompts_use_the_models_own_tokenizer(smol_archive):
    """No BOS is invented for SmolLM2 (its HF tokenizer adds none to raw text)."""
    with Archive(smol_archive) as a:
        assert list(a.model().group["prompt_tokens"][0]) == [55, 11617, 10941, 456, 436]
