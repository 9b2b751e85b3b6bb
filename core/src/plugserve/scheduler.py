"""Token-budget scheduler: decodes first, then chunked prefill, FCFS admission,
preemption by recompute.

Engine contract, once per step:
    out = scheduler.schedule()
    run the model on out.scheduled: item i computes tokens
        seq.all_token_ids[seq.num_computed_tokens : seq.num_computed_tokens + item.num_tokens]
        (read num_computed_tokens BEFORE postprocess); sample only where item.sampled
    scheduler.postprocess(out)            # advances num_computed_tokens, feeds the prefix cache
    for sampled items: seq.append_token(tok); scheduler.finish(seq) if done
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from plugserve.kv_cache import BlockManager
from plugserve.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int
    # True iff this chunk reaches the end of the known tokens, so the step
    # yields logits for the next token and the engine must sample one.
    sampled: bool


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _Step:
    """Mutable state of one schedule() call."""

    __slots__ = ("budget", "chosen", "preempted")

    def __init__(self, budget: int):
        self.budget = budget
        # Insertion-ordered, so a preempted seq can be withdrawn from the batch.
        self.chosen: dict[Sequence, int] = {}
        self.preempted: list[Sequence] = []

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.chosen[seq] = num_tokens
        self.budget -= num_tokens

    def withdraw(self, seq: Sequence) -> None:
        self.budget += self.chosen.pop(seq, 0)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill_size: int | None = None,
    ):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens ({max_num_batched_tokens}) must be > 0"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Per-sequence cap on one prefill chunk; None = only the step budget limits it.
        self.chunked_prefill_size = chunked_prefill_size or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in admission order, oldest first
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------- requests
    def add(self, seq: Sequence, max_new_tokens: int = 0) -> None:
        """Queue seq. Rejects it if prompt + max_new_tokens could never fit the whole
        KV pool: it would otherwise preempt itself forever."""
        need = seq.num_tokens + max_new_tokens
        capacity = self.block_manager.capacity_tokens
        if need > capacity:
            raise ValueError(
                f"sequence {seq.seq_id!r} needs {need} KV slots ({seq.num_tokens} prompt + "
                f"{max_new_tokens} new tokens) but the KV cache holds only {capacity} "
                f"({self.block_manager.num_blocks} blocks x {self.block_manager.block_size})"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` (a copy of parent's tokens, e.g. for n>1) sharing parent's KV.

        The child recomputes its tail (see BlockManager.fork). If the running
        set is full it queues at the front of waiting instead, holding no
        blocks (with prefix caching it will still hit the parent's blocks).
        """
        if len(self.running) < self.max_num_seqs:
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            child.status = SequenceStatus.WAITING
            self.waiting.appendleft(child)

    def abort(self, seq_id: str) -> Sequence | None:
        """Remove a sequence from whichever queue holds it and free its blocks now."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._release(seq)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # ----------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        step = _Step(self.max_num_batched_tokens)

        def remaining(seq: Sequence) -> int:
            return seq.num_tokens - seq.num_computed_tokens

        # 1) Decodes: every running sequence past its prompt gets one token.
        for seq in list(self.running):
            if step.budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and remaining(seq) == 1:
                self._grow(seq, 1, step)

        # 2) Continue partially prefilled running sequences, oldest first.
        for seq in list(self.running):
            if step.budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and remaining(seq) > 1:
                self._grow(seq, min(remaining(seq), step.budget, self.chunked_prefill_size), step)

        # 3) Admit waiting sequences FCFS, stopping at the first that does not
        #    fit so a large early request is not starved by later small ones.
        #    Never admit in a step that preempted: the pool is under pressure
        #    and a just-preempted seq would be readmitted at once.
        bm = self.block_manager
        while self.waiting and step.budget > 0 and len(self.running) < self.max_num_seqs and not step.preempted:
            seq = self.waiting[0]  # waiting sequences hold no blocks
            hits = bm.match_prefix(seq)
            n = min(seq.num_tokens - len(hits) * bm.block_size, step.budget, self.chunked_prefill_size)
            if not bm.allocate_slots(seq, n, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.add(seq, n)

        return SchedulerOutput(
            scheduled=[
                ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens) for seq, n in step.chosen.items()
            ],
            preempted=step.preempted,
        )

    def _grow(self, seq: Sequence, want: int, step: _Step) -> None:
        """Schedule up to `want` tokens of running seq (exactly 1 for a decode),
        preempting the most recently admitted sequences until a block frees up.
        seq itself may end up preempted (then it is not scheduled)."""
        bm = self.block_manager
        while True:
            n = min(want, bm.num_allocatable_tokens(seq))
            if n > 0:
                if not bm.allocate_slots(seq, n):
                    raise RuntimeError(f"allocation of {n} tokens for {seq.seq_id!r} failed after fit check")
                step.add(seq, n)
                return
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                # seq alone holds the whole pool: recomputing would loop forever.
                raise RuntimeError(
                    f"sequence {seq.seq_id!r} outgrew the KV cache ({seq.num_tokens} tokens, "
                    f"{bm.capacity_tokens} slots); pass max_new_tokens to add() to reject it up front"
                )
            self._preempt(victim, step)
            if victim is seq:
                return

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        """Preempt by recompute: drop all its KV; its outputs so far become part of
        what it recomputes (all_token_ids) when readmitted from the queue front."""
        self.running.remove(seq)
        step.withdraw(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        step.preempted.append(seq)
        self.num_preemptions += 1

    # ---------------------------------------------------------- step update
    def postprocess(self, out: SchedulerOutput) -> None:
        """Mark the step's tokens computed and offer newly full blocks to the prefix cache."""
        for item in out.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted mid-step
                continue
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit_computed(seq)
