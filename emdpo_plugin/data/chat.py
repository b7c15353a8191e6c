"""Chat (message-list) prompts and responses, and the one place they become model text.

A message-list prompt or response is kept as `ChatMessages`: a `str` whose value is the
canonical JSON of the messages, so rows stay hashable and every caller that treats prompts as
strings (sets, dict keys, caches) keeps working. `render_prompt` and `render_pair` turn rows into
text with the tokenizer's chat template exactly as OpenRLHF's DPO dataset does
(`apply_chat_template`: the prompt with `add_generation_prompt=True`, the response as the full
conversation's render minus the prompt's); plain strings pass through unchanged. Training,
scoring and sampling all call these two functions.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..errors import DataError

PLAIN, CHAT = "plain", "chat_template"
TEXT_FORMATS = (PLAIN, CHAT)


class ChatMessages(str):
    """A message list (`[{"role": ..., "content": ...}, ...]`) held as its canonical JSON text."""

    __slots__ = ()

    @classmethod
    def of(cls, messages: list[dict[str, Any]]) -> "ChatMessages":
        return cls(json.dumps(messages, ensure_ascii=False, separators=(",", ":")))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return json.loads(self)


def parse_messages(value: Any) -> tuple[ChatMessages | None, str]:
    """(messages, "") for a valid message list, else (None, why); nulls inside a message are dropped
    (columnar formats fill absent struct fields with null)."""
    if not value:
        return None, "an empty message list"
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            return None, f"message {i} is {type(msg).__name__}, not an object with 'role' and 'content'"
        msg = {k: v for k, v in msg.items() if v is not None}
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            return None, f"message {i} has no string 'role'"
        if not isinstance(msg.get("content"), str):
            return None, f"message {i} has no string 'content'"
        out.append(msg)
    try:
        return ChatMessages.of(out), ""
    except TypeError as exc:
        return None, f"a message holds a value that is not JSON: {exc}"


def text_format_of(prompts: Iterable[str]) -> str:
    """`chat_template` if the prompts are message lists, else `plain` (rows agree: io checks it)."""
    return CHAT if any(isinstance(p, ChatMessages) for p in prompts) else PLAIN


def to_record_value(text: str) -> Any:
    """What a data file holds for a prompt or response: the message list, or the string."""
    return text.messages if isinstance(text, ChatMessages) else str(text)


def _messages(text: str, role: str) -> list[dict[str, Any]]:
    return text.messages if isinstance(text, ChatMessages) else [{"role": role, "content": str(text)}]


def _template(tokenizer: Any, what: str):
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name!r} has no chat_template, but the {what} is a message list "
                        f"(text_format {CHAT}); use a tokenizer with a chat template or plain-text prompts")
    return tokenizer.apply_chat_template


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as model text: a message list through the chat template (generation prompt added)."""
    if not isinstance(prompt, ChatMessages):
        return prompt
    return _template(tokenizer, "prompt")(prompt.messages, tokenize=False, add_generation_prompt=True)


def render_pair(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, response text). With a message-list prompt a string response is one
    assistant message; the response text is the conversation's render after the prompt's."""
    if not isinstance(prompt, ChatMessages):
        if isinstance(response, ChatMessages):
            raise DataError("a message-list response needs a message-list prompt (text_format chat_template)")
        return prompt, response
    head = render_prompt(tokenizer, prompt)
    full = _template(tokenizer, "prompt")(prompt.messages + _messages(response, "assistant"), tokenize=False)
    if not full.startswith(head):
        raise DataError(f"chat template: the conversation's render does not start with the prompt's render "
                        f"(add_generation_prompt=True), so the response cannot be split off; prompt {head[:60]!r}")
    return head, full[len(head):]


class TemplateOnly:
    """A chat template without a tokenizer, for `render_*` where no tokenizer exists yet (the
    tiny model's SFT texts); renders as `apply_chat_template(tokenize=False)` does."""

    def __init__(self, chat_template: str, name_or_path: str = "template") -> None:
        self.chat_template, self.name_or_path = chat_template, name_or_path

    def apply_chat_template(self, messages: list[dict[str, Any]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt)
        return rendered[0]
