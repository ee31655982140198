"""The OpenAI API's request bodies that `nxd serve` accepts (pydantic), checked strictly: an
unknown field, a wrong type or a value out of range is a 400 naming the field, never a guess.

Fields OpenAI defines that change the output in ways we do not offer (logprobs, penalties,
n > 1, echo, tools, ...) are accepted only at their defaults, and rejected with a reason otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = True


# OpenAI fields we accept only at these values: name -> (allowed values, why not others).
_ONLY_DEFAULTS = {
    "n": ((None, 1), "one choice per request (send the request n times)"),
    "best_of": ((None, 1), "one choice per request"),
    "echo": ((None, False), "the prompt is not echoed"),
    "logprobs": ((None, False, 0), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not supported"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text responses"),
}


class Sampling(Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: PositiveInt | None = None  # vLLM's extension (the openai client's extra_body)
    seed: int | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    suffix: str | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _only_defaults(self):
        for name, (allowed, why) in _ONLY_DEFAULTS.items():
            value = getattr(self, name, None)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported: {why}")
        return self

    def options(self, max_tokens: int) -> dict:
        """SamplingOptions' keywords for this request, max_tokens resolved by the endpoint."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | TokenIds
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )

    def prompts(self) -> list:
        """One prompt (text or ids) per choice."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
