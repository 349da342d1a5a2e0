"""Prompt sets (conf/prompts/*.yaml: inline `texts` or a `file` with one prompt per line) and
how each model reads them (raw text, or its chat template)."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.errors import EngineError

log = logging.getLogger(__name__)


def load_prompts(texts, file: str | None = None, take=None) -> list[str]:
    """A prompt set's `texts` followed by the non-blank lines of its `file`; with `take`, the
    first `take` of them only (a quick run over part of a set, as `make demo` does)."""
    texts = [str(t) for t in (texts or [])]
    if file:
        path = Path(str(file)).expanduser()
        if not path.is_file():
            raise EngineError(f"prompt file not found: {file}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise EngineError(f"prompt file is not UTF-8 text: {file}") from exc
        kept = [line for line in lines if line.strip()]
        if len(kept) < len(lines):
            log.warning(
                "prompt file %s: %d blank line(s) skipped, %d prompts read",
                path,
                len(lines) - len(kept),
                len(kept),
            )
        texts += kept
    if not texts:
        raise EngineError("no prompts: set prompts.texts or prompts.file")
    if take is not None:
        if isinstance(take, bool) or not isinstance(take, int) or take < 1:
            raise EngineError(f"prompts.take must be a positive integer or null, got {take!r}")
        texts = texts[:take]
    return texts


def check_chat_template(setting) -> None:
    if not (isinstance(setting, bool) or setting == "auto"):
        raise EngineError(f"chat_template must be true, false or auto, got {setting!r}")


def uses_chat_template(tokenizer, setting) -> bool:
    """Whether a model reads prompts through its chat template: `auto` means yes exactly when
    its tokenizer has one (chat/instruct models), no for base models."""
    check_chat_template(setting)
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has
    if setting and not has:
        raise EngineError("chat_template=true but this model's tokenizer has no chat template")
    return bool(setting)


def render(tokenizer, text: str, chat_template) -> tuple[str, list[int]]:
    """(what the model reads, its token ids) for one prompt; chat_template: true/false/auto."""
    if uses_chat_template(tokenizer, chat_template):
        shown = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(shown, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]  # the tokenizer's own BOS convention
        shown = tokenizer.decode(ids)
    if not ids:
        raise EngineError(f"prompt {text!r} tokenizes to nothing")
    return shown, [int(i) for i in ids]
