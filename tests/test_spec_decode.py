"""Speculative decoding: the config, prompt lookup, exact verification (greedy equality with
speculation off; rejection sampling draws from the target distribution), and the engine's
behaviour around it (chunked prompts, preemption, n > 1, stop strings and max_tokens inside
accepted drafts, KV accounting after rollbacks)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sarathi.config import EngineConfig
from sarathi.model_executor.sampler import SampleRequest, sampling_probs
from sarathi.sampling_params import SamplingParams
from sarathi.spec_decode.config import SpeculativeConfig, parse_speculative_config
from sarathi.spec_decode.ngram import propose_ngram
from sarathi.spec_decode.rejection import Verification, verify

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
EARLY_EXIT = '{"method": "early_exit", "num_speculative_tokens": 3, "num_early_exit_layers": 1}'
REPEATING = ["a b c d e f g a b c d e f g a b c d e f g a b c", "the cat sat on the mat. the cat sat on the",
             "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"]
OPEN = ["Once upon a time", "hello"]


# ---- config ----------------------------------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ("{method: ngram}", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"method": "ngram", "k": 3}', "unknown keys"),
    ('{"method": "medusa"}', "method must be one of"),
    ('{"num_speculative_tokens": 3}', "method must be one of"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 1000}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": "3"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens"),
    ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup_min"),
    ('{"method": "ngram", "disable_by_batch_size": 0}', "disable_by_batch_size"),
    ('{"method": "ngram", "model": "x"}', "draft_model"),
    ('{"method": "draft_model"}', 'needs "model"'),
    ('{"method": "early_exit", "prompt_lookup_max": 3}', "ngram's keys"),
    ('{"method": "ngram", "num_early_exit_layers": 3}', "early_exit's key"),
])
def test_bad_speculative_config_is_a_clear_error(bad, says):
    with pytest.raises(ValueError, match="speculative-config") as e:
        parse_speculative_config(bad)
    assert says in str(e.value)
    with pytest.raises(ValueError, match="speculative-config"):
        EngineConfig(speculative_config=bad)


def test_speculative_config_parses_and_round_trips():
    c = parse_speculative_config(NGRAM)
    assert c == SpeculativeConfig("ngram", 4, 1, 3)
    assert parse_speculative_config(c.to_json()) == c
    assert parse_speculative_config(json.loads(NGRAM)) == c
    assert parse_speculative_config(None) is None and parse_speculative_config("") is None
    cfg = EngineConfig(speculative_config=NGRAM)
    assert cfg.replace(seed=1).speculative_decoding_config.speculative_config == c


def test_cli_flag_bad_json_fails_at_startup(capsys):
    from sarathi.__main__ import main

    code = main(["generate", "--prompt", "hi", "--speculative-config", '{"method": "ngram", "bogus": 1}'])
    assert code == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_server_parser_has_the_flag():
    from sarathi.entrypoints.openai.api_server import make_arg_parser

    ns = make_arg_parser().parse_args(["--speculative-config", NGRAM])
    assert EngineConfig.from_cli_args(ns).speculative_decoding_config.speculative_config.method == "ngram"


# ---- prompt lookup ------------------------------------------------------------------
def test_ngram_proposes_the_latest_match_of_the_longest_n():
    toks = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # the last 3 tokens (5, 2, 3) never occurred before; (2, 3) did, latest at 6: 7, 8 follow
    assert propose_ngram(toks, 2, 1, 3) == [7, 8]
    assert propose_ngram(toks, 5, 1, 3) == [7, 8, 5, 2, 3]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([5, 6, 5], 3, 1, 1) == [6, 5, 6]   # period 2: the draft repeats itself
    assert propose_ngram([5, 6, 5], 3, 2, 2) == []
    assert propose_ngram([4], 3, 1, 3) == []
    # the longest n wins over a later match of a shorter one
    assert propose_ngram([1, 2, 3, 4, 9, 3, 5, 1, 2, 3], 1, 1, 3) == [4]



def test_ngram_draft_repeats_the_period_past_the_end_of_the_context():
    # (3, 1, 2) last occurred 3 tokens back: the text repeats with period 3
    assert propose_ngram([1, 2, 3, 1, 2, 3, 1, 2], 5, 1, 3) == [3, 1, 2, 3, 1]
    assert propose_ngram([7, 7], 4, 1, 3) == [7, 7, 7, 7]


def _speculator(spec):
    """A Speculator on a stand-in runner of 30 layers: its policy only, no model."""
    from types import SimpleNamespace

    from sarathi.spec_decode.speculator import Speculator

    runner = SimpleNamespace(model=SimpleNamespace(args=SimpleNamespace(num_layers=30)))
    return Speculator(parse_speculative_config(spec), runner)


def test_k_doubles_after_full_acceptance_and_a_sequence_rests_after_two_misses():
    s = _speculator('{"method": "ngram", "num_speculative_tokens": 8}')
    seen = []
    for k, accepted in [(1, 1), (2, 2), (4, 4), (8, 8), (8, 3), (4, 0), (1, 0), (1, 0), (1, 0)]:
        s._adapt(7, k, accepted)
        seen.append((s.seqs[7].k, s.seqs[7].rest))
    assert seen == [(2, 0), (4, 0), (8, 0), (8, 0), (4, 0), (1, 0), (1, 1), (1, 2), (1, 4)]
    s.seqs[7].rest = 0   # rested; a hit, then one miss: no rest again
    s._adapt(7, 1, 1)
    s._adapt(7, 2, 0)
    assert (s.seqs[7].k, s.seqs[7].rest) == (1, 0)


def test_a_model_drafter_that_does_not_pay_probes_one_token_ever_more_rarely():
    from sarathi.spec_decode.speculator import MAX_PROBE_INTERVAL

    s = _speculator('{"method": "early_exit", "num_speculative_tokens": 3, "num_early_exit_layers": 15}')
    assert s.cost == 0.5 and s._draft_cap() == 3   # no misses yet: full drafts
    for _ in range(10):
        s._record_step(3, 0)
    caps = [s._draft_cap() for _ in range(2000)]
    probes = [i for i, c in enumerate(caps) if c]
    assert all(caps[i] == 1 for i in probes)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[0] <= 3 and max(gaps) == MAX_PROBE_INTERVAL + 1
    assert len(probes) <= 2000 // MAX_PROBE_INTERVAL + 8
    # a probe that hits: the next step probes again, a second hit lifts the rate over the cost
    s._record_step(1, 1)
    assert s.rate < s.cost and s._draft_cap() == 1
    s._record_step(1, 1)
    assert s._draft_cap() == 3


def test_a_step_without_drafts_takes_the_plain_sampler(tiny_model_dir):
    """Only sequences with drafts are verified by the proposer; the rest of the batch, and
    every step without drafts, is drawn by the runner's plain sampler."""
    llm = _llm(tiny_model_dir, NGRAM)
    runner = llm.engine.runner
    verified, plain = [], []
    verify, sample = runner.proposer.verify, runner._sample

    def spy_verify(plan, rows, batch, out):
        verified.extend(len(p.draft_token_ids) for p in plan)
        return verify(plan, rows, batch, out)

    def spy_sample(plan, rows, out):
        plain.extend(len(p.draft_token_ids) for p in plan)
        return sample(plan, rows, out)

    runner.proposer.verify, runner._sample = spy_verify, spy_sample
    _run(llm, REPEATING + OPEN, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert verified and all(k > 0 for k in verified)
    assert plain and all(k == 0 for k in plain)

# ---- rejection sampling: the distribution of plain sampling ---------------------------
def _chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


# chi-square critical value at p = 0.001 for df 1..9
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88]


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_draws_from_the_target_distribution(with_q):
    torch.manual_seed(0)
    vocab = 6
    params = SamplingParams(temperature=0.7, top_k=5, max_tokens=8)
    logits = torch.randn(3, vocab) * 1.5     # positions 0, 1 and the bonus position 2
    reqs = [SampleRequest(params, [0], [], None) for _ in range(3)]
    p = sampling_probs(logits.clone(), reqs)
    q = torch.softmax(torch.randn(2, vocab), -1) if with_q else None
    gen = torch.Generator().manual_seed(1)
    trials = 12000
    first, second = [0] * vocab, [0] * vocab
    for _ in range(trials):
        if q is not None:
            drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        else:
            drafts = [int(p[0].argmax()), int(p[1].argmax())]   # a fixed guess, as prompt lookup makes
        kept = verify([Verification(logits, drafts, q, reqs)], gen)[0]
        first[kept[0].token_id] += 1
        if kept[0].token_id == drafts[0] and len(kept) > 1 and (q is None or drafts[0] == drafts[0]):
            if q is None:   # the second position given the first draft was kept
                second[kept[1].token_id] += 1
    for counts, probs in [(first, p[0].tolist())] + ([(second, p[1].tolist())] if q is None else []):
        df = sum(1 for x in probs if x > 0) - 1
        assert _chi_square(counts, probs) < CHI2_999[df - 1], (counts, probs)


def test_rejection_sampling_second_position_with_a_draft_distribution():
    """Conditioned on the first token, the second is distributed as p at position 1."""
    torch.manual_seed(3)
    vocab = 5
    params = SamplingParams(temperature=1.0, max_tokens=8)
    logits = torch.randn(3, vocab)
    reqs = [SampleRequest(params, [0], [], None) for _ in range(3)]
    p = sampling_probs(logits.clone(), reqs)
    q = torch.softmax(torch.randn(2, vocab), -1)
    gen = torch.Generator().manual_seed(2)
    second = [0] * vocab
    for _ in range(12000):
        drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        drafts[0] = 0   # condition on the first draft being token 0; verification must still be exact
        qq = q.clone()
        qq[0] = torch.nn.functional.one_hot(torch.tensor(0), vocab).float()
        kept = verify([Verification(logits, drafts, qq, reqs)], gen)[0]
        if kept[0].token_id == 0 and len(kept) > 1:
            second[kept[1].token_id] += 1
    assert _chi_square(second, p[1].tolist()) < CHI2_999[vocab - 2], (second, p[1].tolist())


def test_greedy_verification_logprobs_are_the_targets():
    logits = torch.randn(4, 7)
    params = SamplingParams(temperature=0, logprobs=2, max_tokens=8)
    reqs = [SampleRequest(params, [0], [], None) for _ in range(4)]
    target = logits.argmax(-1).tolist()
    drafts = [target[0], target[1], (target[2] + 1) % 7]
    kept = verify([Verification(logits, drafts, None, reqs)], torch.Generator())[0]
    assert [r.token_id for r in kept] == target[:3]
    lp = torch.log_softmax(logits, -1)
    for j, r in enumerate(kept):
        assert math.isclose(r.logprob, float(lp[j, target[j]]), rel_tol=1e-5, abs_tol=1e-6)
        assert r.rank == 1 and len(r.top) == 2


# ---- the engine ----------------------------------------------------------------------
def _llm(model_dir, spec=None, **kw):
    from sarathi import LLM

    args = dict(model=str(model_dir), max_model_len=512, kv_cache_memory="64MiB")
    args.update(kw)
    return LLM(speculative_config=spec, **args)


def _run(llm, prompts, params):
    return [[(c.token_ids, c.text, c.finish_reason) for c in r.outputs] for r in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def smollm_plain(smollm2_dir):
    return _llm(smollm2_dir)


@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT.replace('"num_early_exit_layers": 1', '"num_early_exit_layers": 15')])
def test_greedy_equal_with_speculation_real_model(smollm2_dir, smollm_plain, spec):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = _run(smollm_plain, REPEATING + OPEN, params)
    llm = _llm(smollm2_dir, spec)
    assert _run(llm, REPEATING + OPEN, params) == want
    stats = llm.engine.get_stats()
    if '"ngram"' in spec:
        assert stats["spec_decode_num_accepted_tokens_total"] > 20   # the repeating prompts are copied
    assert stats["spec_decode_num_draft_tokens_total"] >= stats["spec_decode_num_accepted_tokens_total"]
    assert stats["spec_decode_num_drafts_total"] > 0
    llm.engine.kv.check_invariants()


@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT])
def test_greedy_equal_tiny_chunked_n_and_penalties(tiny_model_dir, spec):
    prompts = REPEATING + OPEN
    for params in [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                                  frequency_penalty=0.5, logit_bias={17: 3.0}, min_tokens=5, logprobs=2),
                   SamplingParams(temperature=0, max_tokens=10, n=2, ignore_eos=True)]:
        want = _run(_llm(tiny_model_dir, chunk_size=8), prompts, params)
        assert _run(_llm(tiny_model_dir, spec, chunk_size=8), prompts, params) == want


@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT, "draft"])
def test_preemption_under_a_tight_kv_budget(tiny_model_dir, spec, tmp_path, smollm2_dir):
    """KV memory for 400 tokens, 4 slots, six sequences growing to ~110 tokens each: running
    sequences are preempted, some mid-speculation; nothing is lost and the allocator's
    accounting holds after every step's rollbacks."""
    prompts = [p * 2 for p in REPEATING] + OPEN + [REPEATING[0]]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    want = _run(_llm(tiny_model_dir, max_model_len=512), prompts, params)
    if spec == "draft":   # a draft that is mostly wrong: sequences grow about a token a step, as without
        from conftest import make_tiny_llama

        spec = _draft(make_tiny_llama(tmp_path / "draft", smollm2_dir, seed=5, num_hidden_layers=1))
    llm = _llm(tiny_model_dir, spec, max_model_len=512, kv_cache_memory=320 * 512, page_size=4096, chunk_size=16,
               max_num_seqs=4)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
        engine.kv.check_invariants()
    assert engine.scheduler.num_preemptions > 0
    assert [outs[str(i)] for i in range(len(prompts))] == want
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_stop_strings_and_max_tokens_inside_accepted_drafts(smollm2_dir, smollm_plain):
    llm = _llm(smollm2_dir, NGRAM)
    prompt = REPEATING[0]
    full = _run(smollm_plain, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0][0]
    text = full[1]
    for stop in [text[5:8], text[11:13], " d"]:
        params = SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True)
        assert _run(llm, [prompt], params) == _run(smollm_plain, [prompt], params), stop
    for n in [1, 2, 3, 5, 7, 11]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        got = _run(llm, [prompt], params)
        assert got == _run(smollm_plain, [prompt], params)
        assert len(got[0][0][0]) == n
    ids = full[0]
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[ids[9]])
    assert _run(llm, [prompt], params) == _run(smollm_plain, [prompt], params)
    assert llm.engine.get_stats()["spec_decode_num_accepted_tokens_total"] > 0


def test_streaming_sends_several_tokens_per_step(smollm2_dir):
    llm = _llm(smollm2_dir, NGRAM)
    engine = llm.engine
    engine.add_request("r", REPEATING[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    counts, last = [], 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            counts.append(len(o.outputs[0].token_ids) - last)
            last = len(o.outputs[0].token_ids)
    assert max(counts) > 1 and last == 30


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=20, seed=7, ignore_eos=True)
    a = _run(_llm(tiny_model_dir, EARLY_EXIT), REPEATING, params)
    b = _run(_llm(tiny_model_dir, EARLY_EXIT), REPEATING, params)
    assert a == b


def test_speculation_turns_off_in_steps_of_the_default_batch_size(tiny_model_dir):
    """By default no drafts in a step of 8 sequences or more (a verified position costs about a
    decode row once a step is compute-bound); disable_by_batch_size moves the limit."""
    from sarathi.spec_decode.config import DEFAULT_DISABLE_BY_BATCH_SIZE

    assert parse_speculative_config(EARLY_EXIT).disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE == 8
    prompts = REPEATING * 3   # nine sequences, admitted in one step, all finishing together
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = _run(_llm(tiny_model_dir), prompts, params)
    loaded = _llm(tiny_model_dir, EARLY_EXIT, max_prefills_per_step=0)
    assert _run(loaded, prompts, params) == want
    assert loaded.engine.get_stats()["spec_decode_num_drafts_total"] == 0
    assert _run(loaded, prompts[:2], params) == want[:2]
    assert loaded.engine.get_stats()["spec_decode_num_drafts_total"] > 0
    always = _llm(tiny_model_dir, json.dumps({**json.loads(EARLY_EXIT), "disable_by_batch_size": 64}),
                  max_prefills_per_step=0)
    assert _run(always, prompts, params) == want
    assert always.engine.get_stats()["spec_decode_num_drafts_total"] > 0


def test_optimal_sampling_with_speculation_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="optimal"):
        _llm(tiny_model_dir, NGRAM, optimal_sampling_target=str(tiny_model_dir))


def _draft(model_dir, k=3):
    return json.dumps({"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": k})


def test_draft_model_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    import shutil

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz-not-the-same"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer"):
        _llm(tiny_model_dir, _draft(other))


def test_draft_model_greedy_equal(tiny_model_dir, tmp_path, smollm2_dir):
    from conftest import make_tiny_llama

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = REPEATING + OPEN
    want = _run(_llm(tiny_model_dir, chunk_size=8), prompts, params)
    # the target itself as its draft: every greedy draft is accepted
    same = _llm(tiny_model_dir, _draft(tiny_model_dir), chunk_size=8)
    assert _run(same, prompts, params) == want
    s = same.engine.get_stats()
    assert s["spec_decode_num_accepted_tokens_total"] == s["spec_decode_num_draft_tokens_total"] > 50
    # another model as the draft: most drafts rejected, the output is still the target's
    other = make_tiny_llama(tmp_path / "draft", smollm2_dir, seed=5, num_hidden_layers=1)
    llm = _llm(tiny_model_dir, _draft(other), chunk_size=8)
    assert _run(llm, prompts, params) == want
    assert _run(llm, prompts, SamplingParams(temperature=0, max_tokens=10, n=2, ignore_eos=True)) == \
        _run(_llm(tiny_model_dir, chunk_size=8), prompts, SamplingParams(temperature=0, max_tokens=10, n=2,
                                                                         ignore_eos=True))


def test_draft_model_keeps_its_own_weight_format(tiny_model_dir):
    """A float target (--quantization none) with a GGUF draft: the draft stays in its Q4_1 blocks;
    a draft whose pass costs more than the target's is gated off."""
    from sarathi.model_executor.model_loader import _embedded_smollm2

    # (a small KV budget: the 30-layer draft mirrors it at its own size)
    llm = _llm(tiny_model_dir, _draft(_embedded_smollm2()), quantization="none", kv_cache_memory="16MiB",
               max_model_len=256)
    assert "Q4_1" in llm.engine.runner.proposer.drafter.runner.formats
    assert "Q4_1" not in llm.engine.runner.formats
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert _run(llm, OPEN, params) == _run(_llm(tiny_model_dir, quantization="none"), OPEN, params)
    # a 30-layer draft for a 2-layer target costs 15 target passes a position: no acceptance
    # rate pays for it, so it never drafts (no probes either)
    assert llm.engine.runner.proposer.cost == 15.0
    assert llm.engine.get_stats()["spec_decode_num_drafts_total"] == 0


def test_metrics_expose_the_spec_decode_counters(tiny_model_dir):
    from sarathi.entrypoints.openai.metrics import ServerMetrics

    llm = _llm(tiny_model_dir, _draft(tiny_model_dir))
    llm.generate(REPEATING, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stats = llm.engine.get_stats()
    text = ServerMetrics(llm.engine.get_stats).render().decode()
    drafts = stats["spec_decode_num_drafts_total"]
    assert drafts > 0
    assert f"sarathi:spec_decode_num_drafts_total {float(drafts)}" in text
    assert f"sarathi:spec_decode_num_draft_tokens_total {float(stats['spec_decode_num_draft_tokens_total'])}" in text
    assert f"sarathi:spec_decode_num_accepted_tokens_total {float(stats['spec_decode_num_accepted_tokens_total'])}" \
        in text
    assert 'sarathi:spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text
    assert "acceptance rate" in llm.engine.runner.proposer.summary()


def test_server_streams_speculated_tokens_and_counts_them(tiny_model_dir, tmp_path):
    import httpx
    from server_harness import engine_flags, running_server, sse_events

    flags = ["--model", str(tiny_model_dir), "--speculative-config", _draft(tiny_model_dir)] + \
        engine_flags(dict(max_model_len=512, kv_cache_memory="64MiB"))
    body = dict(model=str(tiny_model_dir), prompt=REPEATING[0], max_tokens=20, temperature=0, ignore_eos=True)
    with running_server(flags, tmp_path / "server.log") as proc, httpx.Client(base_url=proc.base_url, timeout=120) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [e["choices"][0]["text"] for e in sse_events(r.iter_lines()) if e.get("choices")]
        assert "".join(chunks) == whole
        assert len([t for t in chunks if t]) < 20   # several tokens per chunk: every draft is accepted
        metrics = c.get("/metrics").text
        assert "sarathi:spec_decode_num_accepted_tokens_total" in metrics
