"""Scheduler tests, driven by a fake engine loop."""
import pytest
from hypothesis import given, settings, strategies as st

from plugserve.kv_cache import BlockManager
from plugserve.scheduler import Scheduler
from plugserve.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=64, chunk=None, caching=True):
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs, budget, chunk)


def fake_token(seq):
    # Depends on the whole history, like a real model would.
    return hash(tuple(seq.all_token_ids)) % 50


def check_step(sched, out, running_before):
    """Properties every schedule() result must have."""
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert {id(i.seq) for i in out.scheduled} <= {id(s) for s in sched.running}
    for item in out.scheduled:
        assert 1 <= item.num_tokens <= item.seq.num_tokens - item.seq.num_computed_tokens
        assert item.sampled == (item.seq.num_computed_tokens + item.num_tokens == item.seq.num_tokens)
        assert len(item.seq.block_table) * BS >= item.seq.num_computed_tokens + item.num_tokens
    kinds = [
        i.seq.seq_id in running_before and i.seq.num_tokens - i.seq.num_computed_tokens == 1 for i in out.scheduled
    ]
    assert kinds == sorted(kinds, reverse=True), "decodes must come before prefills"
    assert all(not s.block_table for s in sched.waiting)
    sched.block_manager.check_invariants(sched.running)


def step(sched, max_tokens, samples=None):
    """One engine step; finishes sequences reaching max_tokens[seq_id] outputs."""
    running_before = {s.seq_id for s in sched.running}
    out = sched.schedule()
    check_step(sched, out, running_before)
    sched.postprocess(out)
    for item in out.scheduled:
        if item.sampled:
            seq = item.seq
            seq.append_token(fake_token(seq))
            if samples is not None:
                samples[seq.seq_id] = samples.get(seq.seq_id, 0) + 1
            if seq.num_output_tokens >= max_tokens[seq.seq_id]:
                sched.finish(seq)
    return out


def run_all(sched, max_tokens, max_steps=2000):
    samples = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return samples
        step(sched, max_tokens, samples)
    raise AssertionError("did not finish: deadlock or livelock")


def test_chunked_prefill_splits_long_prompt():
    sched = make(budget=32)
    seq = Sequence("a", list(range(100)))
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        out = step(sched, {"a": 5})
        [item] = out.scheduled
        chunks.append((item.num_tokens, item.sampled))
    assert chunks == [(32, False), (32, False), (32, False), (4, True)]


def test_chunked_prefill_size_caps_per_sequence_chunk():
    sched = make(budget=64, chunk=16)
    sched.add(Sequence("a", list(range(40))))
    sched.add(Sequence("b", list(range(100, 140))))
    out = sched.schedule()
    assert [(i.seq.seq_id, i.num_tokens) for i in out.scheduled] == [("a", 16), ("b", 16)]


def test_decodes_first_and_budget_respected():
    sched = make(budget=20)
    max_tokens = {}
    for i in range(3):
        sched.add(Sequence(f"d{i}", [i, i + 1]))
        max_tokens[f"d{i}"] = 10
    step(sched, max_tokens)  # all three prefilled and sampled
    sched.add(Sequence("long", list(range(50))))
    max_tokens["long"] = 1
    out = step(sched, max_tokens)
    assert [(i.seq.seq_id, i.num_tokens) for i in out.scheduled] == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 17)]
    out = step(sched, max_tokens)
    assert [(i.seq.seq_id, i.num_tokens) for i in out.scheduled] == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 17)]
    assert out.num_batched_tokens == 20


def test_max_num_seqs_cap():
    sched = make(max_num_seqs=2)
    for i in range(5):
        sched.add(Sequence(str(i), [i]))
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == ["0", "1"]
    assert sched.num_running == 2 and sched.num_waiting == 3


def test_fcfs_large_head_blocks_later_small_requests():
    sched = make(num_blocks=8)
    max_tokens = {"a": 3, "big": 1, "small": 1}
    sched.add(Sequence("a", list(range(20))))  # 5 blocks
    step(sched, max_tokens)
    sched.add(Sequence("big", list(range(100, 116))))  # needs 4 blocks, 3 free
    sched.add(Sequence("small", [7]))
    out = step(sched, max_tokens)
    assert [i.seq.seq_id for i in out.scheduled] == ["a"]
    order = []
    while sched.has_unfinished():
        out = step(sched, max_tokens)
        order += [i.seq.seq_id for i in out.scheduled if i.seq.seq_id not in order and i.seq.seq_id != "a"]
    assert order == ["big", "small"]


def test_preemption_under_tiny_pool_and_all_finish():
    sched = make(num_blocks=8, max_num_seqs=4, budget=16)
    max_tokens = {}
    for i in range(4):
        sched.add(Sequence(f"s{i}", [10 * i + j for j in range(6)]), max_new_tokens=12)
        max_tokens[f"s{i}"] = 12
    samples = run_all(sched, max_tokens)
    assert sched.num_preemptions > 0
    # Recompute after preemption must not produce extra or missing tokens.
    assert samples == max_tokens
    assert sched.block_manager.usage == 0.0
    sched.block_manager.check_invariants([])


def test_preempted_sequence_recomputes_its_outputs_and_goes_first():
    sched = make(num_blocks=4, max_num_seqs=4, budget=16)
    a, b = Sequence("a", list(range(7))), Sequence("b", list(range(50, 57)))
    sched.add(a)
    sched.add(b)
    max_tokens = {"a": 20, "b": 20}
    while not sched.num_preemptions:
        out = step(sched, max_tokens)
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_output_tokens > 0
    assert sched.waiting[0] is b
    assert b not in [i.seq for i in out.scheduled]


def test_abort_frees_blocks_immediately():
    sched = make(num_blocks=16, max_num_seqs=1)
    sched.add(Sequence("r", list(range(10))))
    sched.add(Sequence("w", list(range(10))))
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 13
    assert sched.abort("r").status is SequenceStatus.FINISHED
    assert sched.block_manager.num_free_blocks == 16 and sched.num_running == 0
    assert sched.abort("w").seq_id == "w" and sched.num_waiting == 0
    assert sched.abort("nope") is None


def test_prefix_hit_reduces_computed_tokens():
    sched = make()
    run_all_tokens = {"a": 2, "b": 1}
    a = Sequence("a", list(range(40)))
    sched.add(a)
    run_all(sched, run_all_tokens)
    b = Sequence("b", list(range(33)) + [99, 98])
    sched.add(b)
    out = sched.schedule()
    [item] = out.scheduled
    assert b.num_cached_prompt_tokens == 32 and b.num_computed_tokens == 32
    assert item.num_tokens == 3 and item.sampled
    assert sched.block_manager.prefix_cache_hit_tokens == 32


def test_too_long_prompt_rejected():
    sched = make(num_blocks=4)
    with pytest.raises(ValueError, match=r"needs 17 KV slots .* holds only 16"):
        sched.add(Sequence("x", list(range(17))))
    with pytest.raises(ValueError, match="needs 20"):
        sched.add(Sequence("y", list(range(10))), max_new_tokens=10)
    assert sched.num_waiting == 0


def test_fork_child_shares_prefix_and_runs_to_completion():
    sched = make(caching=False)
    p = Sequence("p", list(range(10)))
    sched.add(p)
    step(sched, {"p": 5})
    c = Sequence("c", p.all_token_ids)
    sched.fork(p, c)
    assert c.block_table == p.block_table[:2] and c.num_computed_tokens == 8
    out = sched.schedule()
    assert [(i.seq.seq_id, i.num_tokens, i.sampled) for i in out.scheduled] == [("p", 1, True), ("c", 3, True)]
    sched.postprocess(out)
    for i in out.scheduled:
        i.seq.append_token(1)
    run_all(sched, {"p": 5, "c": 5})
    assert sched.block_manager.num_free_blocks == 64


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=6),
    max_new=st.integers(1, 12),
    num_blocks=st.integers(11, 20),  # small pool so preemption is common
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 24),
    chunk=st.one_of(st.none(), st.integers(1, 8)),
    caching=st.booleans(),
)
def test_random_workloads_finish_with_invariants(prompts, max_new, num_blocks, max_num_seqs, budget, chunk, caching):
    sched = make(num_blocks, max_num_seqs, budget, chunk, caching)
    max_tokens = {}
    for i, prompt in enumerate(prompts):
        sched.add(Sequence(str(i), prompt), max_new_tokens=max_new)
        max_tokens[str(i)] = max_new
    assert run_all(sched, max_tokens) == max_tokens
    assert sched.block_manager.usage == 0.0


def test_prefill_growth_preempts_an_already_scheduled_decode():
    # Step 3: B's decode takes the last free block, then older A's prefill
    # chunk needs one: B (newest) is preempted and withdrawn from the batch.
    sched = make(num_blocks=4, budget=8, chunk=4)
    a, b = Sequence("a", list(range(12))), Sequence("b", [50, 51, 52])
    sched.add(a)
    sched.add(b)
    max_tokens = {"a": 1, "b": 5}
    step(sched, max_tokens)
    step(sched, max_tokens)
    out = step(sched, max_tokens)
    assert out.preempted == [b]
    assert [(i.seq.seq_id, i.num_tokens) for i in out.scheduled] == [("a", 4)]
    assert run_all(sched, max_tokens)  # and everything still completes
