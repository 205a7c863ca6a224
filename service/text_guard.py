"""User text is plain text that fits: no special tokens of the model's tokenizer, and a prompt within positions.

Why reject rather than escape: a phrase like `<image>` or `<|im_start|>` is read by the processor as a control
token (an image placeholder, a new chat turn, a location token), which either fails deep inside transformers or
silently changes what the model is asked. No escaping keeps the text's meaning for every tokenizer, so the API
refuses such text with a 422 that names the token (documented in docs/API.md).

The prompt-length guard runs before the worker: the unpruned prompt must fit the LLM's positions, because pruned
tokens keep their ORIGINAL positions, and so must the answer. Text is counted with the model's own tokenizer
(`tokenizers`, no torch), plus the template overhead the worker measured through the real processor.
"""

from __future__ import annotations

import re

from service.errors import ValidationFailedError
from service.messages import WorkerReady


class TextGuard:
    """The checks of one loaded model (built from its `WorkerReady`)."""

    def __init__(self, ready: WorkerReady) -> None:
        specials = sorted((token for token in ready.special_tokens if token), key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(token) for token in specials)) if specials else None
        self._tokenizer = None
        if ready.tokenizer_file is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(ready.tokenizer_file)
        self.max_positions = ready.max_positions
        self._overhead = dict(ready.prompt_overhead_tokens)

    def check_plain(self, text: str, field: str) -> None:
        """422 `special_token_in_text` when `text` contains one of the tokenizer's special tokens."""
        if self._special is None:
            return
        found = self._special.search(text)
        if found is not None:
            raise ValidationFailedError(
                f"'{field}' contains {found.group(0)!r}, a special token of this model's tokenizer; user text "
                "must be plain text (remove or reword it)",
                code="special_token_in_text",
            )

    def text_tokens(self, text: str) -> int:
        """Tokens of `text` alone (its UTF-8 byte count, an upper bound, when the model has no tokenizer.json)."""
        if self._tokenizer is None:
            return len(text.encode("utf-8"))
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def check_length(self, kind: str, text: str, visual_tokens: int, max_new_tokens: int) -> int:
        """The unpruned prompt length; 422 `prompt_too_long` when prompt + answer exceed the positions."""
        prompt = self._overhead.get(kind, max(self._overhead.values(), default=0))
        prompt += self.text_tokens(text) + visual_tokens
        if prompt + max_new_tokens > self.max_positions:
            raise ValidationFailedError(
                f"the prompt is {prompt} tokens (text, template and {visual_tokens} visual tokens) and the answer "
                f"may take {max_new_tokens}, but the model has {self.max_positions} positions; shorten the text "
                "or send a smaller image",
                code="prompt_too_long",
            )
        return prompt


__all__ = ["TextGuard"]
