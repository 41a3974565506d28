"""Rendering a chat template incrementally: each turn yields only its own new text.

A conversation that never ends cannot be re-rendered from the start every turn. Templates render
each message from what came just before it, so the delta for a new message is
``render(context + [message]) - render(context)`` over a short context: the first message (some
templates add a default system prompt before it) and the last few messages, dropped in pairs so
role alternation is preserved. While nothing has been dropped the deltas concatenate to exactly
the full rendering; the tests check that for the embedded model's template.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

SENTINEL = "\u2063STREAMING-LLM-CONTENT\u2063"
KEEP_LAST = 4  # messages of context kept after the first one


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be rendered incrementally."""


class IncrementalChatTemplate:
    """Incremental renderer over a tokenizer's chat template (bounded memory)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not tokenizer.chat_template:
            raise TemplateError("This tokenizer has no chat template; use stream_generate() with raw text instead.")
        self.tokenizer = tokenizer
        self.context: list[dict[str, str]] = []

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _delta(self, before: str, after: str) -> str:
        if not after.startswith(before):
            raise TemplateError(
                "The chat template re-renders earlier messages differently once a new one is added, so it "
                "cannot be streamed turn by turn."
            )
        return after[len(before) :]

    def add(self, role: str, content: str, generation_prompt: bool = False) -> str:
        """Append a message; return the text it adds (plus the assistant header if asked)."""
        message = {"role": role, "content": content}
        text = self._delta(self.render(self.context), self.render([*self.context, message], generation_prompt))
        self._remember(message)
        return text

    def split(self, role: str) -> tuple[str, str]:
        """Text before and after the content of a new ``role`` message (content streamed separately)."""
        probe = self.add(role, SENTINEL)
        if probe.count(SENTINEL) != 1:
            raise TemplateError("The chat template alters message content; it cannot stream a document.")
        before, after = probe.split(SENTINEL)
        self.context[-1] = {"role": role, "content": "(document)"}
        return before, after

    def assistant_tail(self, content: str) -> str:
        """After generating ``content`` for the open assistant turn, the template text that closes it."""
        previous = self.render(self.context, generation_prompt=True)
        message = {"role": "assistant", "content": content}
        full = self.render([*self.context, message])
        tail = self._delta(previous + content, full)
        self._remember(message)
        return tail

    def restore(self, context: list[dict[str, str]]) -> None:
        """Continue from a saved context (what :attr:`context` held).

        Raises:
            ValueError: ``context`` is not a list of ``{"role", "content"}`` messages.
        """
        if not isinstance(context, list) or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
            for m in context
        ):
            raise ValueError("The template context is not a list of messages.")
        self.context = [dict(m) for m in context]

    def _remember(self, message: dict[str, str]) -> None:
        self.context.append(message)
        while len(self.context) > 1 + KEEP_LAST:
            del self.context[1:3]  # drop the oldest pair after the first message
