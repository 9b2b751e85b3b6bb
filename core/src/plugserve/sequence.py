"""Per-request state. Everything the scheduler and block manager need to know
about a request lives on its Sequence, so neither keeps side tables keyed by id."""
from __future__ import annotations

import enum
import itertools
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


# Global admission counter: gives a total FCFS order even for equal timestamps.
_arrival_counter = itertools.count()


class Sequence:
    __slots__ = (
        "seq_id",
        "prompt_token_ids",
        "output_token_ids",
        "status",
        "num_computed_tokens",
        "block_table",
        "num_cached_prompt_tokens",
        "arrival",
        "params",
        "block_hashes",
        "num_committed_blocks",
    )

    def __init__(self, seq_id: str, prompt_token_ids: list[int], params: Any = None):
        if not prompt_token_ids:
            raise ValueError(f"sequence {seq_id!r}: prompt must contain at least one token")
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        # Tokens (a prefix of all_token_ids) whose KV is already in the cache.
        self.num_computed_tokens = 0
        # Block ids holding this sequence's KV, in token order.
        self.block_table: list[int] = []
        # Prefix-cache hit of the latest admission, in tokens (for usage stats).
        self.num_cached_prompt_tokens = 0
        self.arrival = next(_arrival_counter)
        # Opaque to the scheduler (sampling params etc., owned by the engine).
        self.params = params
        # Chain hashes of the full token blocks of all_token_ids, filled lazily
        # by the block manager. Tokens are append-only, so entries never go stale.
        self.block_hashes: list[int] = []
        # Leading blocks of block_table already offered to the prefix cache.
        self.num_committed_blocks = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
