"""Paged KV-cache block accounting with prefix caching.

Host-side bookkeeping only: which block ids each sequence owns. The device
tensors are indexed by these ids (slot of token position p of a sequence is
``block_table[p // block_size] * block_size + p % block_size``).

Every block is in exactly one of three states:
  * free:    ref_count 0, no hash            -> ``_free`` (FIFO)
  * cached:  ref_count 0, registered hash    -> ``_cached`` (LRU, evictable)
  * in use:  ref_count > 0 (may have a hash) -> referenced by block tables

Prefix caching: a block that is full and fully computed gets the chain hash
``hash((parent_hash, tuple(block_tokens)))`` so a hit on block i implies the
whole prefix up to block i matches. Hash collisions are guarded by also
comparing the stored token ids.

Shared blocks are never written: a prefix hit and a fork only share FULL,
computed blocks, and both leave at least the last known token to recompute
into a private block (see ``match_prefix`` and ``fork``). So no copy-on-write
device copies are ever needed.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence as SequenceABC

from plugserve.sequence import Sequence


class _Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # set together with hash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._hash_to_block: dict[int, int] = {}
        # Prefix-cache stats, in tokens, counted once per admission.
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0

    # ------------------------------------------------------------------ stats
    @property
    def capacity_tokens(self) -> int:
        """Most tokens one sequence can ever hold."""
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept only for prefix reuse."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    def block_token_ids(self, block_id: int) -> tuple[int, ...] | None:
        """Tokens a block is registered under in the prefix cache (None if unregistered)."""
        return self._blocks[block_id].token_ids

    # ---------------------------------------------------------------- hashing
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chain hashes of seq's first `num_blocks` full token blocks (memoized on seq)."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            tokens = seq.all_token_ids
            bs = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
                hashes.append(parent)
        return hashes[:num_blocks]

    # ------------------------------------------------------------ allocation
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids holding a prefix of seq's tokens, longest first-miss-stop match.

        Side-effect free; pass the result to ``allocate_slots`` to take them.
        Only blocks lying entirely within ``all_token_ids[:-1]`` are eligible:
        the last token must be computed so the step yields its logits, and
        recomputing it inside a shared block would write to a block other
        sequences read. If the prompt is block-aligned this recomputes the last
        block (block_size tokens) - a small cost for never writing shared blocks.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        tokens = seq.all_token_ids
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._full_block_hashes(seq, max_blocks)):
            block_id = self._hash_to_block.get(h)
            if block_id is None or self._blocks[block_id].token_ids != tuple(tokens[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, num_hits: int) -> int:
        base = seq.num_computed_tokens + num_hits * self.block_size
        total = -(-(base + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table) - num_hits)

    def num_allocatable_tokens(self, seq: Sequence) -> int:
        """How many new tokens of a running seq fit in its table's slack plus free blocks."""
        held = len(seq.block_table) + self.num_free_blocks
        return held * self.block_size - seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: SequenceABC[int] = ()) -> bool:
        # Hits sitting in the evictable LRU stop being allocatable once taken.
        num_cached_hits = sum(1 for b in cached_blocks if self._blocks[b].ref_count == 0)
        needed = self._blocks_needed(seq, num_new_tokens, len(cached_blocks))
        return needed <= self.num_free_blocks - num_cached_hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: SequenceABC[int] = ()) -> bool:
        """Grow seq's block table to hold its next `num_new_tokens` uncomputed tokens.

        All-or-nothing: returns False and changes nothing if blocks are short.
        `cached_blocks` (from ``match_prefix``) is only allowed when seq holds
        no blocks (admission); they are shared and count as computed tokens, so
        `num_new_tokens` are the tokens after them.
        """
        admitting = not seq.block_table and seq.num_computed_tokens == 0
        if cached_blocks and not admitting:
            raise ValueError(f"{seq.seq_id}: prefix hits can only be taken by a sequence with no KV")
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        needed = self._blocks_needed(seq, num_new_tokens, len(cached_blocks))
        if admitting:
            hit_tokens = len(cached_blocks) * self.block_size
            seq.num_cached_prompt_tokens = hit_tokens
            seq.num_computed_tokens = hit_tokens
            seq.num_committed_blocks = len(cached_blocks)
            if self.enable_prefix_caching:
                self.prefix_cache_queried_tokens += seq.num_tokens
                self.prefix_cache_hit_tokens += hit_tokens
            for block_id in cached_blocks:
                self._ref(block_id)
            seq.block_table.extend(cached_blocks)
        seq.block_table.extend(self._take_block() for _ in range(needed))
        return True

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]  # revived from the LRU
        block.ref_count += 1

    def _take_block(self) -> int:
        """A zero-ref block: truly free first, else evict the LRU cached block."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)
            block = self._blocks[block_id]
            del self._hash_to_block[block.hash]
            block.hash = block.token_ids = None
        self._blocks[block_id].ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop seq's references to all its blocks. Does not touch num_computed_tokens."""
        # Reverse order: the tail of a sequence is the least shareable, so it
        # enters the LRU first and is evicted before the common prefix blocks.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._cached[block_id] = None
        seq.block_table = []
        seq.num_committed_blocks = 0

    # -------------------------------------------------------- prefix caching
    def commit_computed(self, seq: Sequence) -> None:
        """Register seq's newly full-and-computed blocks so later requests can hit them.

        Call after advancing seq.num_computed_tokens (the scheduler's
        postprocess does). If an identical block is already registered (two
        sequences computed the same prefix concurrently) ours stays
        unregistered and returns to the free list when released.
        """
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        tokens = seq.all_token_ids
        bs = self.block_size
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block = self._blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self._hash_to_block:
                block.hash = hashes[i]
                block.token_ids = tuple(tokens[i * bs:(i + 1) * bs])
                self._hash_to_block[block.hash] = block.block_id
        seq.num_committed_blocks = num_full

    # ------------------------------------------------------------------ fork
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` (same tokens as parent, no blocks yet) share parent's KV.

        Only full computed blocks inside ``tokens[:-1]`` are shared; the tail
        (partial block + at least the last token) is left for the child to
        recompute into its own blocks. This trades a few recomputed tokens for
        never copying KV on device and never writing a shared block.
        """
        if child.block_table or child.num_computed_tokens:
            raise ValueError(f"fork target {child.seq_id} already holds KV state")
        if child.all_token_ids != parent.all_token_ids:
            raise ValueError(f"fork target {child.seq_id} must have the parent's tokens")
        n = min(parent.num_computed_tokens, child.num_tokens - 1) // self.block_size
        shared = parent.block_table[:n]
        for block_id in shared:
            self._ref(block_id)
        child.block_table = list(shared)
        child.num_computed_tokens = n * self.block_size
        child.num_committed_blocks = min(parent.num_committed_blocks, n)
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens

    # ------------------------------------------------------------ debugging
    def check_invariants(self, live_sequences: Iterable[Sequence]) -> None:
        """Raise AssertionError if bookkeeping is inconsistent (debug/test use)."""
        refs = [0] * self.num_blocks
        for seq in live_sequences:
            assert len(set(seq.block_table)) == len(seq.block_table), f"duplicate block in {seq}"
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, f"computed beyond table: {seq}"
            for block_id in seq.block_table:
                refs[block_id] += 1
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "duplicate id in free list"
        assert not free & cached, "block both free and cached"
        for block in self._blocks:
            b = block.block_id
            assert block.ref_count == refs[b], f"block {b}: ref_count {block.ref_count} != {refs[b]} table refs"
            if block.ref_count == 0:
                assert (b in free) != (b in cached), f"unreferenced block {b} must be free xor cached"
                assert (b in cached) == (block.hash is not None), f"block {b}: cached iff hashed"
            else:
                assert b not in free and b not in cached, f"in-use block {b} in a free structure"
            assert (block.hash is None) == (block.token_ids is None), f"block {b}: hash/token_ids mismatch"
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == b, f"block {b} hash not mapped to it"
                assert len(block.token_ids) == self.block_size, f"block {b}: partial block registered"
        for h, b in self._hash_to_block.items():
            assert self._blocks[b].hash == h, f"hash map entry for block {b} is stale"
