"""The bodies of vLLM's /tokenize and /detokenize routes (pydantic), checked like the OpenAI
bodies of protocol.py: a field they do not declare is a 400 naming it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from serve_app.api.checked import CheckedModel
from serve_app.api.protocol import ChatCompletionRequest, ChatMessage, TokenId, Tool


class TokenizeRequest(CheckedModel):
    # vLLM's endpoint and fields (a prompt, or a chat with its template's arguments); a field it
    # does not declare is a 400 naming it, as on the other routes

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (BOS...): by default yes for a prompt, "
        "no for messages, whose chat template writes its own (vLLM's defaults).",
    )
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def special_tokens(self) -> bool:
        """add_special_tokens, or its default: a prompt's yes, messages' no."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt these messages make (its template and checks)."""
        return ChatCompletionRequest(
            messages=self.messages,
            tools=self.tools,
            add_generation_prompt=self.add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
        )


class DetokenizeRequest(CheckedModel):
    model: str | None = None
    tokens: list[TokenId]
