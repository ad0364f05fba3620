"""Chat templates as plain strings, exactly as the reference pipeline renders them (docs/truncation.md).

A sequence is encoded as separate text pieces (prompt, response, next prompt, ...), each with
``tok.encode(text, add_special_tokens=False)`` (special tokens in the text are parsed), and the
pieces' ids are concatenated. For one user turn with the Qwen template::

    prompt   = "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{x}<|im_end|>\\n<|im_start|>assistant\\n"
    response = "{y}<|im_end|>"

Templates: ``qwen`` (Qwen2 / Qwen2.5 ChatML, default system "You are a helpful assistant.") and
``llama3`` (Llama-3 / 3.1 headers, ``<|begin_of_text|>`` prefix, no default system prompt).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """String slots of a chat template. ``{content}`` is replaced by the message text."""

    name: str
    prefix: str  # once, at the start of the first prompt piece (e.g. a BOS token as text)
    system_format: str
    user_format: str  # user turn plus the assistant header (the generation prompt)
    assistant_format: str  # assistant text plus its end-of-turn token
    turn_separator: str  # put before the user turn of every turn after the first (prompt side)
    default_system: Optional[str]
    stop_token: str  # the end-of-turn token that ends every response

    def prompt(self, x: str, system: Optional[str] = None, first_turn: bool = True) -> str:
        """The prompt piece of one turn. ``system`` None -> the default system prompt ("" -> none)."""
        if not first_turn:
            return self.turn_separator + self.user_format.format(content=x)
        sys_text = self.default_system if system is None else system
        out = self.prefix
        if sys_text:
            out += self.system_format.format(content=sys_text)
        return out + self.user_format.format(content=x)

    def response(self, y: str) -> str:
        """The response piece: the text plus the end-of-turn token (labels are computed on it)."""
        return self.assistant_format.format(content=y)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


QWEN = ChatTemplate(
    name="qwen",
    prefix="",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>",
    turn_separator="\n",
    default_system=QWEN_DEFAULT_SYSTEM,
    stop_token="<|im_end|>",
)

LLAMA3 = ChatTemplate(
    name="llama3",
    prefix="<|begin_of_text|>",
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user_format=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant_format="{content}<|eot_id|>",
    turn_separator="",
    default_system=None,
    stop_token="<|eot_id|>",
)

TEMPLATES = {"qwen": QWEN, "qwen2": QWEN, "chatml": QWEN, "llama3": LLAMA3, "llama3.1": LLAMA3}


def get_template(template: Union[str, ChatTemplate], default_system: Optional[str] = None) -> ChatTemplate:
    """A template by name (``qwen``, ``llama3``) or as given; ``default_system`` overrides its default."""
    if isinstance(template, ChatTemplate):
        tpl = template
    else:
        try:
            tpl = TEMPLATES[template]
        except KeyError:
            raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}") from None
    if default_system is not None:
        tpl = dataclasses.replace(tpl, default_system=default_system)
    return tpl
