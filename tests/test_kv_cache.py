"""BlockManager: unit tests plus a stateful property test against a model of
what each block's KV slots hold."""
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from plugserve.kv_cache import BlockManager
from plugserve.sequence import Sequence

BS = 4


def computed(bm, seq, n):
    """Simulate the model writing n tokens' KV, then the step commit."""
    seq.num_computed_tokens += n
    bm.commit_computed(seq)


def run_prompt(bm, seq):
    hits = bm.match_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - len(hits) * BS, hits)
    computed(bm, seq, seq.num_tokens - seq.num_computed_tokens)
    return hits


def test_allocate_grows_table_and_free_returns_blocks():
    bm = BlockManager(8, BS)
    seq = Sequence("a", list(range(6)))
    assert bm.allocate_slots(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    computed(bm, seq, 6)
    seq.append_token(99)
    assert bm.allocate_slots(seq, 1)  # slot 6 still in block 1
    assert len(seq.block_table) == 2
    computed(bm, seq, 1)
    seq.append_token(98)
    assert bm.allocate_slots(seq, 1) and len(seq.block_table) == 2
    computed(bm, seq, 1)
    seq.append_token(97)
    assert bm.allocate_slots(seq, 1) and len(seq.block_table) == 3
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_failed_allocation_changes_nothing():
    bm = BlockManager(2, BS)
    seq = Sequence("a", list(range(12)))
    assert not bm.can_allocate(seq, 12)
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.prefix_cache_queried_tokens == 0


def test_prefix_hit_shares_full_blocks_and_counts_stats():
    bm = BlockManager(16, BS)
    a = Sequence("a", list(range(10)))
    run_prompt(bm, a)
    b = Sequence("b", list(range(9)) + [55, 56])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8 and b.num_cached_prompt_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.prefix_cache_queried_tokens == 10 + 11 and bm.prefix_cache_hit_tokens == 8
    bm.check_invariants([a, b])


def test_block_aligned_prompt_recomputes_last_block():
    # All 2 blocks are cached, but the last prompt token must be computed to
    # get logits, so only the first block is reused.
    bm = BlockManager(16, BS)
    run_prompt(bm, Sequence("a", list(range(8))))
    b = Sequence("b", list(range(8)))
    assert len(bm.match_prefix(b)) == 1
    c = Sequence("c", list(range(9)))
    assert len(bm.match_prefix(c)) == 2


def test_freed_blocks_stay_cached_and_lru_evicts_oldest():
    bm = BlockManager(4, BS)
    a = Sequence("a", list(range(9)))  # 2 full blocks + 1 token
    run_prompt(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    # A fresh 1-block seq takes a truly free block first: cache intact.
    x = Sequence("x", [70, 71])
    run_prompt(bm, x)
    assert bm.num_cached_blocks == 2
    # Needing 2 more blocks evicts cached ones; the tail block (freed first) goes first.
    y = Sequence("y", [80] * 5)
    assert bm.allocate_slots(y, 5)
    assert bm.num_cached_blocks == 1 and bm.block_token_ids(a_blocks[0]) == (0, 1, 2, 3)
    assert bm.block_token_ids(a_blocks[1]) is None
    assert len(bm.match_prefix(Sequence("z", list(range(9))))) == 1
    bm.check_invariants([x, y])


def test_hit_on_cached_block_revives_it():
    bm = BlockManager(3, BS)
    a = Sequence("a", list(range(5)))
    run_prompt(bm, a)
    bm.free(a)
    b = Sequence("b", list(range(5)))
    hits = bm.match_prefix(b)
    assert len(hits) == 1
    # 3 more blocks would be needed, but the hit itself is one of the 3
    # "free" (cached) blocks, so only 2 are really available.
    assert bm.num_free_blocks == 3 and not bm.can_allocate(b, 1 + 8, hits)
    assert bm.allocate_slots(b, 1, hits)
    assert bm.num_cached_blocks == 0
    bm.check_invariants([b])


def test_duplicate_concurrent_block_not_registered_twice():
    bm = BlockManager(8, BS)
    a, b = Sequence("a", list(range(5))), Sequence("b", list(range(5)))
    assert bm.allocate_slots(a, 5) and bm.allocate_slots(b, 5)
    computed(bm, a, 5)
    computed(bm, b, 5)
    bm.check_invariants([a, b])
    bm.free(b)  # its unregistered duplicate goes back to truly free
    assert bm.num_cached_blocks == 0
    bm.check_invariants([a])


def test_fork_shares_only_full_blocks_and_child_recomputes_tail():
    bm = BlockManager(8, BS)
    p = Sequence("p", list(range(10)))
    run_prompt(bm, p)
    p.append_token(42)
    c = Sequence("c", p.all_token_ids)
    bm.fork(p, c)
    assert c.block_table == p.block_table[:2] and c.num_computed_tokens == 8
    assert bm.allocate_slots(c, c.num_tokens - 8)
    assert c.block_table[2] != p.block_table[2]
    bm.check_invariants([p, c])
    with pytest.raises(ValueError):
        bm.fork(p, Sequence("d", [1, 2, 3]))


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = Sequence("a", list(range(9)))
    run_prompt(bm, a)
    bm.free(a)
    assert bm.match_prefix(Sequence("b", list(range(9)))) == []
    assert bm.num_cached_blocks == 0 and bm.prefix_cache_hit_rate == 0.0


def test_check_invariants_detects_corruption():
    bm = BlockManager(4, BS)
    a = Sequence("a", [1, 2])
    assert bm.allocate_slots(a, 2)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # block referenced by nobody but ref_count 1
    bm._free.append(bm._free[0])
    with pytest.raises(AssertionError):
        bm.check_invariants([a])


# --------------------------------------------------------------- stateful test
PREFIXES = [list(range(10)), [0, 1, 2, 3, 9, 9, 9, 9, 8], [5] * 10]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions with shared prefixes, chunked growth, decode appends,
    forks and frees on a small pool (so the LRU evicts). The model `kv` records
    what each KV slot holds: the token prefix it was computed from."""

    @initialize(num_blocks=st.integers(4, 12), caching=st.booleans())
    def setup(self, num_blocks, caching):
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
        self.live: list[Sequence] = []
        self.kv: dict[int, dict[int, tuple]] = {}
        self.next_id = 0

    def _new_seq(self, tokens):
        self.next_id += 1
        return Sequence(str(self.next_id), tokens)

    def _compute(self, seq, n):
        tokens = seq.all_token_ids
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[pos // BS]
            owners = sum(block in s.block_table for s in self.live)
            assert owners == 1, "wrote KV into a shared block"
            self.kv.setdefault(block, {})[pos % BS] = tuple(tokens[: pos + 1])
        computed(self.bm, seq, n)

    @rule(base=st.sampled_from(PREFIXES), cut=st.integers(0, 10),
          suffix=st.lists(st.integers(0, 3), max_size=6), chunk=st.integers(1, 16))
    def admit(self, base, cut, suffix, chunk):
        tokens = base[:cut] + suffix or [0]
        seq = self._new_seq(tokens)
        hits = self.bm.match_prefix(seq)
        assert len(hits) * BS < len(tokens)
        for i, block in enumerate(hits):
            assert self.bm.block_token_ids(block) == tuple(tokens[i * BS:(i + 1) * BS])
            for off in range(BS):
                assert self.kv[block][off] == tuple(tokens[: i * BS + off + 1]), "hit returned wrong KV"
        free_before = self.bm.num_free_blocks
        n = min(chunk, len(tokens) - len(hits) * BS)
        if self.bm.allocate_slots(seq, n, hits):
            self.live.append(seq)
            self._compute(seq, n)
        else:
            assert seq.block_table == [] and self.bm.num_free_blocks == free_before

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data):
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(data.draw(st.integers(0, 3)))
        n = data.draw(st.integers(1, seq.num_tokens - seq.num_computed_tokens))
        table_before = list(seq.block_table)
        if self.bm.allocate_slots(seq, n):
            self._compute(seq, n)
        else:
            assert seq.block_table == table_before

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = self._new_seq(parent.all_token_ids)
        self.bm.fork(parent, child)
        assert child.num_computed_tokens % BS == 0 and child.num_computed_tokens < child.num_tokens
        self.live.append(child)

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants(self.live)
        in_use = set().union(*(s.block_table for s in self.live)) if self.live else set()
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(in_use)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
