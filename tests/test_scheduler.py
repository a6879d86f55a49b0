"""Scheduler invariants on a fake clock, no model and no torch."""
from __future__ import annotations

import random
import sys

import pytest

from sarathi.core.kv_manager import KVManager
from sarathi.core.scheduler import StepResult, make_scheduler
from sarathi.core.sequence import Sequence


def _seq(i, prompt_len, max_tokens, t=None):
    return Sequence(i, f"r{i}", 0, [7] * prompt_len, float(i if t is None else t), max_tokens)


def _run_step(sched, out, finished):
    """What the engine does after a step: 'sample' token 1 for every chunk that reached its
    sequence's end and hand the result to the scheduler, which finishes what stopped."""
    finished.extend(sched.update_from_output(out, StepResult({i.seq.seq_id: 1 for i in out.scheduled if i.samples})))


def _drive(name, seqs, num_blocks=64, block=16, slots=8, chunk=32, max_steps=5000, check=None):
    kv = KVManager(num_blocks, block, slots)
    sched = make_scheduler(name, kv, slots, 4096, chunk, None)
    for s in seqs:
        sched.add(s)
    finished, steps = [], 0
    while sched.has_unfinished():
        out = sched.schedule()
        if check:
            check(sched, out)
        _run_step(sched, out, finished)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return sched, finished, steps


def test_no_torch_import():
    assert "sarathi.core.scheduler" in sys.modules
    import sarathi.core.scheduler as s
    assert "torch" not in s.__dict__


def test_sarathi_budget_and_stall_free():
    rng = random.Random(0)
    seqs = [_seq(i, rng.randint(1, 200), rng.randint(1, 40)) for i in range(40)]

    def check(sched, out):
        # Token budget (decodes may fill it alone, but prefills never push it over).
        assert out.num_prefill_tokens + out.num_decode_tokens <= max(sched.chunk_size, out.num_decode_tokens)
        # Stall-free: every running decode is in the batch whenever a prefill is.
        if out.prefills:
            decoding = {s.seq_id for s in sched.running if not s.is_prefill and s not in
                        [p.seq for p in out.prefills]}
            scheduled = {d.seq.seq_id for d in out.decodes}
            assert decoding <= scheduled
        # Layout: prefill chunks first, then decodes.
        kinds = [item.seq.num_uncomputed_tokens > 1 or item in out.prefills for item in out.scheduled]
        assert kinds == sorted(kinds, reverse=True)

    sched, finished, _ = _drive("sarathi", seqs, num_blocks=400, check=check)
    assert len(finished) == 40
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_vllm_prefill_steps_are_prefill_only():
    seqs = [_seq(i, 50, 10) for i in range(10)]

    def check(sched, out):
        assert not (out.prefills and out.decodes)

    _, finished, _ = _drive("vllm", seqs, num_blocks=400, check=check)
    assert len(finished) == 10


def test_orca_mixes_whole_prompts_with_decodes():
    seqs = [_seq(i, 30 + i, 3 + 4 * i, t=i) for i in range(6)]
    mixed = []

    def check(sched, out):
        for p in out.prefills:
            assert p.num_scheduled_tokens == len(p.seq.prompt_token_ids)
        mixed.append(bool(out.prefills and out.decodes))

    _, finished, _ = _drive("orca", seqs, num_blocks=400, slots=3, check=check)
    assert len(finished) == 6 and any(mixed)


def test_preemption_takes_the_newest():
    kv = KVManager(num_blocks=6, block_size=4, num_slots=4, watermark=0.0)
    kv.watermark_blocks = 0
    sched = make_scheduler("sarathi", kv, 4, 4096, 64, None)
    a, b = _seq(0, 7, 100), _seq(1, 7, 100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq for s in out.prefills] == [a, b]
    finished = []
    preempted = []
    for _ in range(20):
        _run_step(sched, out, finished)
        out = sched.schedule()
        preempted += out.preempted
        if preempted:
            break
    assert preempted and preempted[0] is b
    assert b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert a in sched.running


@pytest.mark.parametrize("name", ["sarathi", "vllm", "orca"])
def test_tight_memory_finishes_with_bounded_restarts(name):
    # Room for about two sequences at full length; eight want in.
    seqs = [_seq(i, 40, 60) for i in range(8)]
    sched, finished, _ = _drive(name, seqs, num_blocks=14, block=16, slots=8, chunk=32)
    assert len(finished) == 8
    assert all(s.num_preemptions <= 1 for s in seqs), [s.num_preemptions for s in seqs]
    assert sched.num_preemptions <= len(seqs)


def test_prompt_longer_than_max_model_len_rejected():
    kv = KVManager(100, 16, 4)
    sched = make_scheduler("sarathi", kv, 4, 64, 32, None)
    with pytest.raises(ValueError, match="cannot be scheduled"):
        sched.add(_seq(0, 64, 1))
    with pytest.raises(ValueError, match="cannot be scheduled"):
        sched.add(_seq(1, 0, 1))


def test_kv_manager_accounting():
    kv = KVManager(10, 4, 2, watermark=0.0)
    s0 = kv.admit(0, 9)                # 3 blocks
    assert kv.num_free_blocks == 7 and kv.blocks_held(0) == 3
    kv.grow(0, 13)                     # 4 blocks
    assert kv.num_free_blocks == 6
    s1 = kv.admit(1, 1)
    assert s0 != s1 and not kv.can_admit(1)  # no slot left
    assert kv.free(0) == s0 and kv.num_free_blocks == 9
    with pytest.raises(RuntimeError):
        kv.grow(1, 4 * 11)


def test_update_from_output_token_stops():
    kv = KVManager(64, 16, 4)
    sched = make_scheduler("sarathi", kv, 4, 12, 64, None)
    eos = Sequence(0, "eos", 0, [7] * 3, 0.0, 10, eos_token_ids=frozenset({2}), min_tokens=2)
    stop = Sequence(1, "stop", 0, [7] * 3, 0.0, 10, stop_token_ids=frozenset({5}))
    length = Sequence(2, "len", 0, [7] * 3, 0.0, 2)
    ctx = Sequence(3, "ctx", 0, [7] * 10, 0.0, 100)
    for s in (eos, stop, length, ctx):
        sched.add(s)
    out = sched.schedule()
    assert all(item.samples for item in out.scheduled)
    # EOS before min_tokens is not a stop (the sampler blocks it; the scheduler must not stop either).
    assert eos.blocked_token_ids == {2}
    done = sched.update_from_output(out, StepResult({eos.seq_id: 2, stop.seq_id: 5, length.seq_id: 9,
                                                     ctx.seq_id: 9}))
    assert all(s.num_computed_tokens == len(s.prompt_token_ids) for s in (eos, stop, length, ctx))
    assert eos.finish_reason is None and eos.output_token_ids == [2]
    assert (stop.finish_reason, stop.stop_reason) == ("stop", 5) and done == [stop] and stop.is_finished
    assert length.finish_reason is None and ctx.finish_reason is None
    out = sched.schedule()
    assert {item.seq for item in out.decodes} == {eos, length, ctx}
    done = sched.update_from_output(out, StepResult({eos.seq_id: 2, length.seq_id: 9, ctx.seq_id: 9}))
    assert (eos.finish_reason, eos.stop_reason) == ("stop", None)   # EOS counts once min_tokens are out
    assert length.finish_reason == "length"                         # max_tokens
    assert (ctx.finish_reason, ctx.num_tokens) == ("length", 12)    # max_model_len
    assert set(done) == {eos, length, ctx} and not sched.has_unfinished()


def test_failed_step_advances_nothing():
    kv = KVManager(64, 16, 4)
    sched = make_scheduler("sarathi", kv, 4, 128, 64, None)
    seq = _seq(0, 5, 3)
    sched.add(seq)
    out = sched.schedule()
    assert sched.update_from_output(out, StepResult({seq.seq_id: 1}, error="boom")) == []
    assert seq.num_computed_tokens == 0 and seq.output_token_ids == []
    sched.finish([seq], "abort")
    assert seq.finish_reason == "abort" and kv.num_free_blocks == kv.num_blocks
    ops = sched.schedule().kv_ops
    assert [type(op).__name__ for op in ops] == ["FreeSlot"] and not sched.has_pending_memory_ops()


def _first_token_steps(max_prefills, prompts, chunk=512):
    """Drive the sarathi scheduler; the step at which each sequence got its first token, and
    the most distinct requests seen with prompt chunks in one step."""
    kv = KVManager(256, 16, 8)
    sched = make_scheduler("sarathi", kv, 8, 4096, chunk, None, max_prefills=max_prefills)
    for i, n in enumerate(prompts):
        sched.add(_seq(i, n, 4, t=0.0))
    first, finished, steps = _run_to_end(sched, chunk, 1000)
    assert len(finished) == len(prompts)
    return first, max(len(prefills) for prefills, _ in steps)


def _run_to_end(sched, budget, limit, arrive=lambda step: None):
    """Run the scheduler to the end (`arrive(step)` may add requests before each step), checking
    the token budget. Returns (step of each sequence's first sample, finished sequences,
    per step: (request ids with a prefill chunk, seq ids decoding))."""
    first, finished, steps = {}, [], []
    while sched.has_unfinished():
        arrive(len(steps))
        out = sched.schedule()
        assert out.num_prefill_tokens + out.num_decode_tokens <= max(budget, out.num_decode_tokens)
        steps.append(({p.seq.request_id for p in out.prefills}, {d.seq.seq_id for d in out.decodes}))
        for item in out.scheduled:
            if item.samples:
                first.setdefault(item.seq.seq_id, len(steps) - 1)
        _run_step(sched, out, finished)
        assert len(steps) < limit
    return first, finished, steps


def test_one_prompt_per_step_spreads_first_tokens():
    # Four 40-token prompts arrive together; the budget holds all four.
    packed, widest = _first_token_steps(0, [40] * 4)
    assert packed == {0: 0, 1: 0, 2: 0, 3: 0} and widest == 4
    spread, widest = _first_token_steps(1, [40] * 4)
    assert spread == {0: 0, 1: 1, 2: 2, 3: 3} and widest == 1
    two, widest = _first_token_steps(2, [40] * 4)
    assert two == {0: 0, 1: 0, 2: 1, 3: 1} and widest == 2


def test_one_prompt_per_step_holds_new_prompts_behind_a_chunked_one():
    # 100-token prompt, 64-token budget: its last 36 tokens leave 28 of budget that the
    # 10-token prompt takes only when the limit allows two prompts in a step.
    assert _first_token_steps(0, [100, 10], chunk=64)[0] == {0: 1, 1: 1}
    assert _first_token_steps(1, [100, 10], chunk=64)[0] == {0: 1, 1: 2}


@pytest.mark.parametrize("max_prefills", [1, 2])
def test_prefill_limit_random_workload_finishes(max_prefills):
    rng = random.Random(max_prefills)
    prompts = [rng.randint(1, 300) for _ in range(40)]
    first, widest = _first_token_steps(max_prefills, prompts, chunk=96)
    assert len(first) == 40 and widest <= max_prefills


def test_streams_decode_every_step_while_a_long_prompt_prefills():
    # A 2,000-token prompt takes 32 chunks of 64; short requests arriving meanwhile decode in
    # every step once they have their first token: no stream waits a step for a prompt.
    kv = KVManager(1024, 16, 16)
    sched = make_scheduler("sarathi", kv, 16, 8192, 64, None, max_prefills=1)
    sched.add(_seq(0, 2000, 4, t=0.0))

    def arrive(step):
        if 1 <= step // 3 <= 8 and step % 3 == 0:
            sched.add(_seq(step // 3, 20, 30, t=float(step)))
    # (at most 9 decodes a step: the budget bound is the 64 tokens)
    first, finished, steps = _run_to_end(sched, 64, 2000, arrive)
    decoded, step = [d for _, d in steps], len(steps)
    assert len(finished) == 9
    for i in range(1, 9):
        steps = [t for t in range(first[i] + 1, step) if i in decoded[t]]
        assert steps == list(range(first[i] + 1, first[i] + 30)), (i, steps[:5])
