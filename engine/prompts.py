"""Prompt sets (conf/prompts/*.yaml: inline `texts` or a `file` with one prompt per line) and
how each model reads them (raw text, or its chat template)."""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError


def load_prompts(pcfg) -> list[str]:
    texts = list(pcfg.texts or [])
    if pcfg.file:
        path = Path(str(pcfg.file)).expanduser()
        if not path.is_file():
            raise EngineError(f"prompt file not found: {pcfg.file}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise EngineError(f"prompt file is not UTF-8 text: {pcfg.file}") from exc
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise EngineError("no prompts: set prompts.texts or prompts.file")
    return texts


def render(tokenizer, text: str, chat_template: bool) -> tuple[str, list[int]]:
    """(what the model reads, its token ids) for one prompt."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError("chat_template=true but this model's tokenizer has no chat template")
        shown = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True, tokenize=False)
        ids = tokenizer(shown, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]  # the tokenizer's own BOS convention
        shown = tokenizer.decode(ids)
    if not ids:
        raise EngineError(f"prompt {text!r} tokenizes to nothing")
    return shown, [int(i) for i in ids]
