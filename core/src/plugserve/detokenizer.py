"""Incremental detokenization and stop-string matching for streaming.

Decoding one token at a time is wrong for two reasons: a token may carry only
part of a multi-byte UTF-8 character (byte-level BPE, SentencePiece byte
fallback), and a token's text can depend on its neighbours (SentencePiece
drops the leading "▁" of the first token of a decode). So, like vLLM, we
decode a short window of ids twice, [prefix_offset:read_offset] and
[prefix_offset:], and emit the difference. Whatever context effect the window
start has appears in both decodes and cancels. If the longer decode ends in
U+FFFD, the last token ended mid-character and we emit nothing until a later
token completes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt kept as left context, so that the first output token
# is decoded as a continuation (e.g. SentencePiece "▁Hi" -> " Hi", not "Hi").
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    The concatenated deltas (plus `finish()`) equal
    tokenizer.decode(prompt + output)[len(decode(prompt)):] in the usual case,
    and tokenizer.decode(output) when the prompt is empty. Decoding is done
    with clean_up_tokenization_spaces=False: cleanup rewrites text already
    streamed (" ." -> "."), so it cannot be applied incrementally.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the tail of the prompt is ever decoded: keep just that.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far (excludes held-back bytes)."""
        return "".join(self._text_parts)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one output token; return the newly completed text ('' if none)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def finish(self) -> str:
        """Flush text held back at end of stream (e.g. a trailing partial char,
        which then decodes to U+FFFD exactly as tokenizer.decode would)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (
                not final and new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(prefix_text):]
        # Slide the window: what was read becomes the next decode's context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(delta)
        return delta


@dataclass
class StopMatch:
    text: str  # final output text, truncated at (or after) the stop string
    stop: str  # the stop string that matched


class StopChecker:
    """Finds stop strings in accumulated output text.

    When several stop strings occur, the one that ENDS first wins (ties: the
    longest), which is what token-by-token streaming would have seen first,
    so the result does not depend on how the text was chunked.
    """

    def __init__(self, stop: Sequence[str] | str, include_stop_str_in_output: bool = False) -> None:
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_len = max((len(s) for s in self.stop), default=0)

    def check(self, text: str, new_chars: int | None = None) -> StopMatch | None:
        """Return the truncated final text if a stop string occurs in `text`.

        new_chars: how many chars at the end of `text` are new since the last
        call; earlier text is only rescanned where a stop string could
        straddle the boundary. None scans everything.
        """
        if not self.stop:
            return None
        start = 0
        if new_chars is not None:
            start = max(0, len(text) - new_chars - self.max_len + 1)
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, s = best
        cut = end if self.include_stop_str_in_output else end + neg_len
        return StopMatch(text[:cut], s)

    def holdback(self, text: str) -> int:
        """How many trailing chars of `text` a streamer must not send yet,
        because they are a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
