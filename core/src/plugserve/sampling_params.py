"""Per-request sampling parameters (OpenAI / vLLM semantics).

Validation happens once, at construction, so the sampler never has to
re-check ranges on the hot path. Every error message names the field and the
allowed range so that API users can fix their request without reading code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_N = 128
MAX_LOGPROBS = 20


def _bad(name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: object) -> bool:
    # bool is an int subclass; True as a token count is almost surely a bug.
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    n: number of independent completions (1..128).
    temperature: >= 0; 0 means greedy (argmax, ties -> lowest token id).
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: 0 or -1 disables it, otherwise keep the k most likely tokens (>= 1).
    min_p: in [0, 1]; drop tokens whose probability < min_p * max probability.
    seed: makes sampling reproducible whatever else is in the batch.
        Child i of an n>1 request uses seed + i (see clone_for_child).
    presence_penalty, frequency_penalty: in [-2, 2], OpenAI definition over
        generated tokens: logit -= frequency * count + presence * (count > 0).
    repetition_penalty: > 0, HF/CTRL style over prompt + generated tokens:
        logit / p if logit > 0 else logit * p. 1 disables it.
    stop: strings that end generation (a single str is accepted).
    stop_token_ids: token ids that end generation (besides EOS).
    max_tokens: >= 1, or None for "up to the context limit".
    min_tokens: >= 0; EOS and stop_token_ids are suppressed until reached.
    ignore_eos: keep generating past EOS.
    logprobs: None for none; k in 0..20 returns the chosen token's logprob plus
        the top-k alternatives.
    skip_special_tokens: drop special tokens when detokenizing.
    include_stop_str_in_output: keep the matched stop string in the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _bad("n", f"an integer in [1, {MAX_N}]", self.n)
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise _bad(name, "a number", v)
            setattr(self, name, float(v))
        if self.temperature < 0:
            raise _bad("temperature", ">= 0 (0 = greedy)", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", "in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or not (self.top_k in (0, -1) or self.top_k >= 1):
            raise _bad("top_k", "0 or -1 (disabled) or an integer >= 1", self.top_k)
        if self.top_k == -1:
            self.top_k = 0  # one canonical "off" value for the sampler
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", "an integer or None", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise _bad(name, "in [-2, 2]", v)
        if not self.repetition_penalty > 0.0:
            raise _bad("repetition_penalty", "> 0 (1 = off)", self.repetition_penalty)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise _bad("stop", "a non-empty string or a list of non-empty strings", self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", "a list of integers >= 0", self.stop_token_ids)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _bad("max_tokens", "an integer >= 1 or None", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _bad("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and (
                not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone_for_child(self, index: int) -> "SamplingParams":
        """Params for completion `index` (0-based) of an n>1 request.

        The child has n=1. If the request is seeded, child i gets seed + i so
        that the n completions differ from one another yet each is
        reproducible; child 0 keeps the original seed, so n=1 and child 0 of
        n>1 produce the same text.
        """
        if not 0 <= index < self.n:
            raise _bad("index", f"in [0, {self.n})", index)
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)
