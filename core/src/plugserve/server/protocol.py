"""OpenAI-compatible wire format: validated request models and response builders.

Unknown request fields are ignored (OpenAI SDKs add new parameters faster than
servers implement them); known fields are validated and a bad value becomes a
400 that names the field.  Features we cannot honour (tools, logit_bias, JSON
mode, suffix, images) are rejected instead of silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class _CommonRequest(_Base):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Any = Field(None, validate_default=True)  # normalised to list[str]
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Extensions (vLLM-compatible names).
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    min_tokens: Optional[int] = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        return self

    def sampling_kwargs(self, *, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        """Keyword arguments for ``SamplingParams``.

        Only fields the client set are passed, so SamplingParams' own defaults
        (and its own "disabled" conventions, e.g. for top_k) apply otherwise.
        """
        kw: dict[str, Any] = {"n": self.n, "max_tokens": max_tokens, "stop": list(self.stop),
                              "logprobs": logprobs}
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "min_tokens", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if name in self.model_fields_set:
                kw[name] = getattr(self, name)
        return kw


class CompletionRequest(_CommonRequest):
    prompt: Any
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> list:
        """Normalise to a non-empty list of prompts, each a str or a list of token ids."""
        def is_ids(x: Any) -> bool:
            return (isinstance(x, list) and len(x) > 0
                    and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x))

        if isinstance(v, str):
            return [v]
        if is_ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or is_ids(p) for p in v):
            return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, "
                         "or a list of token-id lists")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Any) -> Any:
        if v:
            raise ValueError("suffix is not supported")
        return v


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _flatten_content(cls, v: Any) -> str:
        """Accept a string or a list of text parts; return plain text for the template."""
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError('content parts must be objects like {"type": "text", "text": ...}')
                if part["type"] != "text":
                    raise ValueError(f"content part type {part['type']!r} is not supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("must be a string or a list of content parts")

    def to_template_dict(self) -> dict[str, str]:
        # Many chat templates only know "system"; "developer" is OpenAI's new name for it.
        role = "system" if self.role == "developer" else self.role
        msg = {"role": role, "content": self.content}
        if self.name:
            msg["name"] = self.name
        return msg


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"] = "text"


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is not None and v.type != "text":
            raise ValueError(f"response_format {v.type!r} is not supported")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tools are not supported")
        return v

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------- errors

def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error, e.g. ('... messages[0].role ...', 'messages[0].role')."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    param = ""
    for part in err.get("loc", ()):
        if part == "body":
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not param:
        return msg, None
    if err.get("type") == "missing":
        return f"'{param}' is a required property", param
    return f"Invalid value for '{param}': {msg}", param


# --------------------------------------------------------------------------- responses

def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenTexts:
    """Per-token display strings for logprobs, cached (decoding one id at a time is hot)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id], skip_special_tokens=False)
                    if self._tokenizer is not None else f"token_id:{token_id}")
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = text
        return text


def chat_logprobs(entries: list[dict], token_text: TokenTexts) -> dict:
    """Engine per-token logprob dicts -> OpenAI chat ``logprobs`` object."""
    content = []
    for e in entries:
        tok = token_text(e["token_id"])
        content.append({
            "token": tok, "logprob": e["logprob"], "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := token_text(tid)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                for tid, lp in e.get("top_logprobs") or ()],
        })
    return {"content": content}


def completion_logprobs(entries: list[dict], token_text: TokenTexts, offset: int) -> dict:
    """Engine per-token logprob dicts -> legacy completions ``logprobs`` object.

    ``offset`` is the character position where these tokens start in the
    choice's text (non-zero for later stream chunks and with echo).
    """
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tok = token_text(e["token_id"])
        tokens.append(tok)
        token_logprobs.append(e["logprob"])
        alts = {token_text(tid): lp for tid, lp in e.get("top_logprobs") or ()}
        top.append(alts or {tok: e["logprob"]})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def completion_response(request_id: str, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage, "system_fingerprint": None}


def chat_response(request_id: str, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage, "system_fingerprint": None}
