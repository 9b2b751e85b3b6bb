"""What the engine returns for each request that progressed in a step."""
from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str                      # full text so far (a possible stop-string prefix held back while running)
    token_ids: list[int]
    finish_reason: str | None      # "stop" | "length" | "abort" | None while running
    logprobs: list[dict] | None    # per token: {"token_id", "logprob", "top_logprobs": [(id, logprob), ...]}


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0     # prompt tokens served from the prefix cache
