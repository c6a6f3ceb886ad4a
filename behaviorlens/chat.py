"""Chat templates and tokenizer helpers: the one place prompts meet a model's chat format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SENTINEL = "\ue000"  # a private-use character no template or prompt contains


def has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = True) -> str:
    """``messages`` in the tokenizer's chat template, as text."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """A user request as the model meets it: its chat template with the generation prompt
    (plain tokens for a tokenizer without a template)."""
    if not has_template(tokenizer):
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def turn_end(tokenizer: Any) -> str | None:
    """The text a chat template puts after a user turn's content (None without a template)."""
    if not has_template(tokenizer):
        return None
    text = render_chat(tokenizer, [{"role": "user", "content": SENTINEL}], generation_prompt=False)
    return text.split(SENTINEL, 1)[1].strip() or None


def template_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of the chat scaffolding: special tokens and the tokens a template writes around a
    turn's content (role names, separators)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    if has_template(tokenizer):
        text = render_chat(tokenizer, [{"role": "user", "content": SENTINEL}])
        after = text.split(SENTINEL, 1)[1]
        ids |= set(tokenizer(after, add_special_tokens=False)["input_ids"])
    return sorted(ids)


class Scaffold:
    """Which tokens of a batch are the template's rather than the conversation's words: padding,
    the first token (the attention sink), a template prefix at a row's start (default system
    prompt and user header) and template token ids (special tokens, role names, separators)."""

    def __init__(self, tokenizer: Any) -> None:
        self.prefix = torch.tensor(_template_prefix(tokenizer), dtype=torch.long)
        self.ids = torch.tensor(template_token_ids(tokenizer), dtype=torch.long)

    def content(self, ids: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, tokens] bool: the conversation's own tokens."""
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
        keep = real & ~torch.isin(ids, self.ids.to(ids.device))
        n = len(self.prefix)
        for row in range(ids.shape[0]):
            cols = real[row].nonzero().flatten()
            if len(cols) == 0:
                continue
            start = int(cols[0])
            keep[row, start] = False
            if n and ids.shape[1] - start >= n and torch.equal(ids[row, start:start + n].cpu(), self.prefix):
                keep[row, start:start + n] = False
        return keep


def _template_prefix(tokenizer: Any) -> list[int]:
    """The token ids a chat prompt starts with before the user's words (empty without a template)."""
    if not has_template(tokenizer):
        return []
    text = render_chat(tokenizer, [{"role": "user", "content": SENTINEL}])
    return list(tokenizer(text.split(SENTINEL, 1)[0], add_special_tokens=False)["input_ids"])
