"""Automatic prefix caching through the engine, on both KV backends: outputs with and
without caching are the same (greedy tokens, logprobs within 1e-5), hits skip prefill
work, memory is shared as the kernel sees it, and faults (aborts, preemption,
eviction) leave the books balanced: the KVManager's and the native allocator's
invariants are checked after every engine step."""
from __future__ import annotations

import random

import pytest

from sarathi.core.kv_manager import ReleaseBlocks, RetainBlock
from sarathi import LLM, SamplingParams
from sarathi.engine.llm_engine import cache_namespace

BACKENDS = ["vattention", "paged"]
BASE = dict(kv_cache_memory="48MiB", max_model_len=2048, chunk_size=256, seed=0)


def check_books(eng) -> None:
    """Both allocators' invariants, and the cache's pins match the prefix cache's blocks."""
    eng.kv.check_invariants()
    cache = getattr(eng.runner.kv_backend, "cache", None)
    if cache is not None:
        cache.check_invariants()
        if eng.kv.enable_prefix_caching:
            # the cache's blocks, less those the next step retains, plus those it releases
            ops = eng.kv.pending_ops
            retains = sum(isinstance(op, RetainBlock) for op in ops)
            releases = sum(len(op.blocks) for op in ops if isinstance(op, ReleaseBlocks))
            pinned = cache.core.stats()["blocks_pinned"]   # (no smaps read)
            assert pinned == eng.kv.num_cached_blocks - retains + releases


def engine(model_dir, backend, caching, **kw):
    return LLM(model=str(model_dir), kv_cache_backend=backend, enable_prefix_caching=caching, **{**BASE, **kw})


def drive(llm, requests, abort=None):
    """Add (request id, prompt ids, params) and step to the end, checking the books every
    step; abort(step, engine) may abort requests. Returns finished outputs by id."""
    eng = llm.engine
    for rid, ids, params in requests:
        eng.add_request(rid, None, params, prompt_token_ids=ids)
    done, step = {}, 0
    while eng.has_unfinished_requests():
        if abort is not None:
            abort(step, eng)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        check_books(eng)
        step += 1
    assert eng.kv.num_free_blocks == eng.kv.num_blocks and eng.kv.num_free_slots == eng.kv.num_slots
    return done


def tokens_and_logprobs(out):
    return [(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in out.outputs]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for rid in a:
        for (ta, la), (tb, lb) in zip(tokens_and_logprobs(a[rid]), tokens_and_logprobs(b[rid])):
            assert ta == tb, rid
            assert max((abs(x - y) for x, y in zip(la, lb)), default=0.0) <= 1e-5, rid


def greedy(n=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, ignore_eos=True, **kw)


def both(model_dir, backend, requests_of, abort=None, **kw):
    """Run the same workload without and with caching; returns (without, with, with-engine)."""
    results = []
    for caching in (False, True):
        llm = engine(model_dir, backend, caching, **kw)
        results.append(drive(llm, requests_of(), abort))
        if caching:
            results.append(llm.engine)
        else:
            llm.engine.close()
    return results


def rand_ids(rng, n):
    return [rng.randrange(100, 40000) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_system_prompt(tiny_model_dir, backend):
    rng = random.Random(1)
    system = rand_ids(rng, 700)
    users = [rand_ids(rng, rng.randrange(5, 60)) for _ in range(6)]

    def requests():
        return [(f"r{i}", system + u, greedy()) for i, u in enumerate(users)]

    off, on, eng = both(tiny_model_dir, backend, requests, max_num_seqs=2)
    assert_same(off, on)
    cached = [on[f"r{i}"].num_cached_tokens for i in range(6)]
    assert all(c == 0 for c in (off[r].num_cached_tokens for r in off))
    assert cached[0] == 0 and all(c >= 640 for c in cached[2:]), cached
    stats = eng.get_stats()
    assert stats["prefix_cache_hits"] == sum(cached) and stats["prefix_cache_queries"] >= 6 * 700
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_turn_chat_grows_the_conversation(tiny_model_dir, backend):
    rng = random.Random(2)
    turns = [rand_ids(rng, rng.randrange(20, 90)) for _ in range(5)]
    results = {}
    for caching in (False, True):
        llm = engine(tiny_model_dir, backend, caching)
        history, outs = [], {}
        for i, turn in enumerate(turns):
            history = history + turn
            out = drive(llm, [(f"t{i}", list(history), greedy(16))])
            outs.update(out)
            history = history + out[f"t{i}"].outputs[0].token_ids
        results[caching] = outs
        if caching:
            # Each turn finds everything but the new user turn (and the last sampled token).
            for i in range(1, 5):
                prompt = len(outs[f"t{i}"].prompt_token_ids)
                assert outs[f"t{i}"].num_cached_tokens >= prompt - len(turns[i]) - 1, i
        llm.engine.close()
    assert_same(results[False], results[True])


@pytest.mark.parametrize("page_size", [None, 4096])
def test_prompts_diverging_inside_a_page(tmp_path_factory, smollm2_dir, page_size):
    """vAttention pages of 16 KiB... or 4 KiB that split tokens (192-byte tokens): each
    prompt diverges from the first at a different offset inside a page."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path_factory.mktemp("tiny-192"), smollm2_dir, hidden_size=96,
                            num_attention_heads=6, num_key_value_heads=3)
    rng = random.Random(3)
    base = rand_ids(rng, 600)
    cuts = [1, 7, 21, 22, 43, 64, 85, 200, 255, 256, 257, 431, 599]

    def requests():
        return [("base", base, greedy())] + [(f"c{c}", base[:c] + rand_ids(random.Random(c), 30), greedy())
                                              for c in cuts]

    off, on, eng = both(model, "vattention", requests, page_size=page_size, max_num_seqs=1)
    assert_same(off, on)
    per_page = eng.runner.kv_backend.cache.tokens_per_page
    assert page_size is None or eng.runner.kv_backend.cache.page_size % 192 != 0
    for c in cuts:
        got = on[f"c{c}"].num_cached_tokens
        assert got <= c and (c < per_page or got >= c - per_page - 1), (c, got)
    # Cut points inside a page are reused up to the cut (copy on write of the partial page).
    assert on["c43"].num_cached_tokens >= 40 and on["c257"].num_cached_tokens >= 250
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_samples_share_the_prompt(tiny_model_dir, backend):
    rng = random.Random(4)
    prompt = rand_ids(rng, 1000)
    params = SamplingParams(n=8, temperature=0.8, top_p=0.95, seed=1234, max_tokens=10, logprobs=1, ignore_eos=True)
    off, on, eng = both(tiny_model_dir, backend, lambda: [("n8", prompt, params)])
    assert_same(off, on)
    assert on["n8"].num_cached_tokens == 0
    assert len({tuple(c.token_ids) for c in on["n8"].outputs}) > 1     # really sampled
    prefill = sum(s.num_prefill_tokens for s in eng.step_stats)
    # The prompt ran once; each later sample computed at most its last token.
    assert prefill <= 1000 + 7 * 1, prefill
    assert eng.get_stats()["prefix_cache_hits"] == 7 * 999
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_and_eviction_under_a_tight_budget(tiny_model_dir, backend):
    rng = random.Random(5)
    prefixes = [rand_ids(rng, 200) for _ in range(2)]
    prompts = [prefixes[i % 2] + rand_ids(rng, rng.randrange(20, 60)) for i in range(6)]

    def requests():
        return [(f"p{i}", p, greedy(200)) for i, p in enumerate(prompts)]

    # 640 tokens of memory (512 bytes each), six sequences growing to ~450 tokens: even with
    # the prefixes shared they do not fit, so running sequences are preempted and cached
    # blocks evicted.
    kw = dict(kv_cache_memory=640 * 512, max_num_seqs=6, chunk_size=128,
              page_size=8192 if backend == "vattention" else None)
    off, on, eng = both(tiny_model_dir, backend, requests, **kw)
    assert_same(off, on)
    assert eng.scheduler.num_preemptions > 0
    assert eng.get_stats()["prefix_cache_hits"] > 0
    eng.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_aborts_mid_prefill_leave_shared_pages_intact(tiny_model_dir, backend):
    rng = random.Random(6)
    system = rand_ids(rng, 900)
    prompts = {f"a{i}": system + rand_ids(rng, 40) for i in range(8)}
    victims = {"a2", "a3", "a5", "a6"}

    def requests():
        return [(rid, p, greedy(20)) for rid, p in prompts.items()]

    def abort(step, eng):
        # Abort after the victims have been admitted (aliased pages in hand), mid-prefill.
        if step == 4:
            running = {s.request_id for s in eng.scheduler.running}
            eng.abort_request([r for r in victims if r in running or r in eng.output_processor.requests])

    off, on, eng = both(tiny_model_dir, backend, requests, abort=abort, chunk_size=128, max_num_seqs=8)
    survivors = {r for r in on if on[r].outputs[0].finish_reason != "abort"}
    assert survivors == set(prompts) - victims
    assert_same({r: off[r] for r in survivors}, {r: on[r] for r in survivors})
    eng.close()


def test_salts_and_tokenizers_isolate(tiny_model_dir):
    llm = engine(tiny_model_dir, "vattention", True)
    rng = random.Random(7)
    prompt = rand_ids(rng, 400)
    first = drive(llm, [("s1", prompt, greedy(4, cache_salt="tenant-a"))])
    other = drive(llm, [("s2", prompt, greedy(4, cache_salt="tenant-b"))])
    same = drive(llm, [("s3", prompt, greedy(4, cache_salt="tenant-a"))])
    none = drive(llm, [("s4", prompt, greedy(4))])
    assert first["s1"].num_cached_tokens == 0 and other["s2"].num_cached_tokens == 0
    assert same["s3"].num_cached_tokens == 399 and none["s4"].num_cached_tokens == 0
    assert first["s1"].outputs[0].token_ids == same["s3"].outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")
    # Prompt logprobs need every position computed: such a request never hits.
    plp = drive(llm, [("s5", prompt, greedy(2, cache_salt="tenant-a", prompt_logprobs=1))])
    assert plp["s5"].num_cached_tokens == 0 and len(plp["s5"].prompt_logprobs) == 400
    llm.engine.close()
    # The tokenizer is part of every block's identity: an AdaptiVocab patch never shares.
    from adaptivocab_testutil import small_patch_tokenizer

    eng = llm.engine
    base = cache_namespace(tiny_model_dir, "none", "torch.float32", eng.tokenizer)
    patched = cache_namespace(tiny_model_dir, "none", "torch.float32", small_patch_tokenizer())
    assert base != patched


def test_reset_prefix_cache(tiny_model_dir):
    llm = engine(tiny_model_dir, "vattention", True)
    prompt = rand_ids(random.Random(8), 500)
    drive(llm, [("x", prompt, greedy(2))])
    eng = llm.engine
    assert eng.kv.num_cached_blocks > 0 and eng.runner.kv_stats()["kv_blocks_pinned"] > 0
    assert llm.reset_prefix_cache() > 0
    check_books(eng)
    assert eng.runner.kv_stats()["kv_blocks_pinned"] == 0
    assert drive(llm, [("y", prompt, greedy(2))])["y"].num_cached_tokens == 0
    eng.close()


def test_sixteen_requests_hold_a_2000_token_prefix_once(tiny_model_dir):
    """The kernel's view while all 16 run: the memfd holds the shared prefix once."""
    rng = random.Random(9)
    prefix = rand_ids(rng, 2000)
    figures = {}
    for caching in (False, True):
        llm = engine(tiny_model_dir, "vattention", caching, max_num_seqs=16, kv_cache_memory="96MiB",
                     chunk_size=2048, page_size=8192)
        eng = llm.engine
        for i in range(16):
            eng.add_request(f"m{i}", None, greedy(40), prompt_token_ids=prefix + rand_ids(rng, 8))
        while not (len(eng.scheduler.running) == 16 and all(not s.is_prefill for s in eng.scheduler.running)):
            eng.step()
            check_books(eng)
        st = eng.runner.kv_backend.cache.stats()
        figures[caching] = (st["pool_resident_bytes"], st["rss_bytes_mapped"], st["pss_bytes_mapped"])
        eng.abort_request([f"m{i}" for i in range(16)])
        check_books(eng)
        eng.close()
    (res_off, rss_off, pss_off), (res_on, rss_on, pss_on) = figures[False], figures[True]
    per_token = 2 * 2 * 2 * 16 * 4                     # K and V, 2 layers, 2 KV heads x 16 dims, fp32
    assert res_off >= 16 * 2000 * per_token                     # every request its own copy
    page_tokens = eng.runner.kv_backend.cache.tokens_per_page
    # The prefix once (twice at most: a request admitted in the leader's first step, before
    # anything was cached, computes its own), plus a copied and a mapped-ahead page each.
    assert res_on <= (2 * 2000 + 16 * 2 * page_tokens) * per_token
    assert res_off / res_on > 5
    assert rss_on >= 15 * 2000 * per_token                      # each slot still maps the prefix...
    assert pss_on <= res_on < rss_on / 6                        # ...but its Pss share is a sixteenth


def test_random_shared_prefix_workloads(tiny_model_dir):
    """Random prompts over a few shared prefixes, random lengths, aborts and a tight
    budget; the books are checked every step and greedy outputs match a cache-free run."""
    rng = random.Random(10)
    prefixes = [rand_ids(rng, rng.randrange(10, 400)) for _ in range(4)]
    prompts = [rng.choice(prefixes)[: rng.randrange(5, 400)] + rand_ids(rng, rng.randrange(1, 50))
               for _ in range(24)]
    lengths = [rng.randrange(1, 30) for _ in prompts]
    victims = set(rng.sample(range(24), 5))
    abort_steps = {i: rng.randrange(1, 40) for i in victims}

    def requests():
        return [(f"w{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, lengths))]

    def abort(step, eng):
        eng.abort_request([f"w{i}" for i, s in abort_steps.items() if s == step])

    for backend in BACKENDS:
        kw = dict(kv_cache_memory=2400 * 512, max_num_seqs=6, chunk_size=96,
                  page_size=16384 if backend == "vattention" else None)
        off, on, eng = both(tiny_model_dir, backend, requests, abort=abort, **kw)
        kept = {r for r in on if on[r].outputs[0].finish_reason != "abort"} & \
               {r for r in off if off[r].outputs[0].finish_reason != "abort"}
        assert len(kept) >= 15
        assert_same({r: off[r] for r in kept}, {r: on[r] for r in kept})
        assert eng.get_stats()["prefix_cache_hits"] > 0
        eng.close()


def test_prompts_per_step_change_when_first_tokens_come_not_what_they_are(tiny_model_dir):
    """--max-prefills-per-step: the CPU default runs one request's prompt per step; 2 or 0 (as
    many as the budget holds) pack more. Tokens and logprobs are the same either way."""
    rng = random.Random(5)
    system = rand_ids(rng, 100)
    users = [rand_ids(rng, rng.randrange(5, 40)) for _ in range(6)]
    results, widest = {}, {}
    for limit in (None, 2, 0):
        llm = engine(tiny_model_dir, "vattention", True, max_prefills_per_step=limit, max_num_seqs=8)
        sched, seen = llm.engine.scheduler, []
        schedule = sched.schedule

        def recording(schedule=schedule, seen=seen):
            out = schedule()
            seen.append(len({p.seq.request_id for p in out.prefills}))
            return out

        sched.schedule = recording
        results[limit] = drive(llm, [(f"r{i}", system + u, greedy()) for i, u in enumerate(users)])
        widest[limit] = (sched.max_prefills, max(seen))
        llm.engine.close()
    assert widest[None] == (1, 1) and widest[2] == (2, 2) and widest[0][0] == 0 and widest[0][1] > 2
    assert_same(results[None], results[0])
    assert_same(results[None], results[2])
    with pytest.raises(ValueError, match="max_prefills_per_step"):
        engine(tiny_model_dir, "vattention", True, max_prefills_per_step=-1)
