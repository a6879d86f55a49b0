"""Speculative decoding together with the other features: structured outputs (drafts cut where
the grammar refuses them, a grammar mask at every verified position), LoRA adapters and
AdaptiVocab patched tokenizers. Every check compares with the same engine without speculation;
constrained outputs are checked by Python's re / json / jsonschema, not by the grammar library."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from sarathi import LLM, LoRARequest, SamplingParams
from sarathi.model_executor.sampler import SampleRequest, sampling_probs
from sarathi.sampling_params import StructuredOutputsParams as SO
from sarathi.spec_decode.rejection import Verification, verify

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
EARLY_EXIT_SMOLLM = '{"method": "early_exit", "num_speculative_tokens": 3, "num_early_exit_layers": 15}'
EARLY_EXIT_TINY = '{"method": "early_exit", "num_speculative_tokens": 3, "num_early_exit_layers": 1}'
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
EMAIL = r"[a-z0-9._]{1,20}@[a-z0-9]{1,15}\.(com|org|net)"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["name", "age", "tags"]}
CHOICES = ["yes", "no", "maybe so"]
# (question, constraint, checker): the questions quote what the answer copies, so prompt lookup drafts
CONSTRAINED = [
    ('Copy this JSON exactly: {"name": "Ada Lovelace", "age": 36, "tags": ["a", "b"]}', SO(json=PERSON),
     lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ("The moon landing was on 1969-07-20. When was the moon landing? Answer with the date.", SO(regex=DATE),
     lambda t: re.fullmatch(DATE, t)),
    ("Her address is ada.lovelace@math.org. What is her email address?", SO(regex=EMAIL),
     lambda t: re.fullmatch(EMAIL, t)),
    ("Is water wet? Answer yes or no.", SO(choice=CHOICES), lambda t: t in CHOICES),
]
UNCONSTRAINED = ["Repeat: the cat sat on the mat. the cat sat on the mat.", "Count: 1, 2, 3, 1, 2, 3, 1, 2, 3,"]


def _llm(spec=None, **kw):
    return LLM(speculative_config=spec, **{**dict(max_model_len=1024, kv_cache_memory="256MiB"), **kw})


def _chat(llm, question):
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)


def _run(llm, prompts, params, **kw):
    return [[(c.token_ids, c.text, c.finish_reason) for c in r.outputs] for r in llm.generate(prompts, params, **kw)]


# ---- rejection sampling under a grammar: exact in distribution -------------------------------
def test_rejection_sampling_with_a_grammar_mask_draws_from_the_masked_target():
    """The draft d ~ q is cut when the grammar refuses it (no draft, the token comes from p);
    otherwise verified against q restricted to the allowed tokens. The first token must be
    distributed as p masked by the grammar; q puts most of its mass on refused tokens, so using
    the unrestricted q would be visibly biased."""
    from sarathi.model_executor.sampler import apply_token_bitmask

    torch.manual_seed(0)
    vocab = 8
    allowed = [1, 2, 4, 5]
    bitmask = torch.zeros(2, 1, dtype=torch.int32)
    bitmask[:] = sum(1 << t for t in allowed)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    logits = torch.randn(2, vocab)
    reqs = [SampleRequest(params, [0], [], None) for _ in range(2)]
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask, [0, 1])
    p = sampling_probs(masked, reqs)[0].tolist()
    q = torch.tensor([[0.3, 0.05, 0.2, 0.25, 0.05, 0.05, 0.05, 0.05]])
    gen = torch.Generator().manual_seed(4)
    counts = [0] * vocab
    for _ in range(12000):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        if d in allowed:
            kept = verify([Verification(logits, [d], q.clone(), reqs)], gen, [(bitmask, [0, 1])])[0]
        else:   # cut before verification: a plain draw from the masked target
            kept = verify([Verification(logits[:1], [], None, reqs[:1])], gen, [(bitmask[:1], [0])])[0]
        counts[kept[0].token_id] += 1
    assert all(counts[t] == 0 for t in range(vocab) if t not in allowed)
    n = sum(counts)
    chi2 = sum((counts[t] - n * p[t]) ** 2 / (n * p[t]) for t in allowed)
    assert chi2 < 16.27, (counts, p)   # df 3, p = 0.001


# ---- structured outputs on the real model ----------------------------------------------------
@pytest.fixture(scope="module")
def plain(smollm2_dir):
    return _llm()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT_SMOLLM])
def test_constrained_greedy_equals_without_speculation(plain, spec):
    """JSON schema, regexes and a choice, alone and in a batch with unconstrained speculating rows:
    token for token what decoding without speculation gives, and valid."""
    llm = _llm(spec)
    prompts = [_chat(llm, q) for q, _, _ in CONSTRAINED]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so) for _, so, _ in CONSTRAINED]
    got = _run(llm, prompts, params)
    assert got == _run(plain, prompts, params)
    for (_, _, check), [(_, text, finish)] in zip(CONSTRAINED, got):
        assert finish == "stop" and check(text), text
    stats = llm.engine.get_stats()
    assert stats["spec_decode_num_drafts_total"] > 0    # constrained rows speculate
    if spec == NGRAM:
        assert stats["spec_decode_num_accepted_tokens_total"] >= 15   # the quoted JSON, date and address
    free = [_chat(llm, q) for q in UNCONSTRAINED]
    mixed_prompts = [free[0]] + prompts + [free[1]]
    free_params = SamplingParams(temperature=0, max_tokens=40)
    mixed_params = [free_params] + params + [free_params]
    assert _run(llm, mixed_prompts, mixed_params) == _run(plain, mixed_prompts, mixed_params)
    llm.engine.kv.check_invariants()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT_SMOLLM])
def test_constrained_seeded_sampling_is_reproducible_and_valid(spec):
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=100, structured_outputs=so)
              for seed in (1, 2) for _, so, _ in CONSTRAINED]
    checks = [check for _ in (1, 2) for _, _, check in CONSTRAINED]
    a_llm = _llm(spec)
    prompts = [_chat(a_llm, q) for _ in (1, 2) for q, _, _ in CONSTRAINED]
    a = _run(a_llm, prompts, params)
    assert a == _run(_llm(spec), prompts, params)
    for check, [(_, text, finish)] in zip(checks, a):
        assert finish == "stop" and check(text), text
    assert a_llm.engine.get_stats()["spec_decode_num_drafts_total"] > 0


def test_drafts_stop_where_the_grammar_refuses_them(smollm2_dir):
    """The manager's allowed_prefix cuts a draft before the first refused token and before a stop
    token, and leaves the matcher where it was."""
    llm = _llm(NGRAM)
    mask = llm.engine.runner.masks[0]
    tok = llm.get_tokenizer()

    class Seq:   # the fields the manager reads
        def __init__(self, sid, output):
            self.seq_id, self.output_token_ids = sid, output
            self.params = SamplingParams(structured_outputs=SO(choice=CHOICES))

    mask.compiled(SO(choice=CHOICES)).result(30)
    maybe = tok.encode("maybe so", add_special_tokens=False)
    yes = tok.encode("yes", add_special_tokens=False)
    eos = tok.eos_token_id
    seqs = [Seq(10_001, []), Seq(10_002, []), Seq(10_003, maybe[:1])]
    drafts = [maybe + [eos, yes[0]], yes + maybe, maybe[1:] + [eos]]
    assert mask.allowed_prefix(seqs, drafts) == [len(maybe), len(yes), len(maybe) - 1]
    # the matchers hold what they held: a one-row bitmask per sequence allows the same as before
    bits, rows = mask.bitmask(seqs)
    assert rows == [0, 1, 2]
    before = bits[:3].clone()
    bits, rows = mask.bitmask(seqs, [maybe, [], maybe[1:]])
    assert rows == list(range(len(maybe) + 1)) + [len(maybe) + 1] + list(range(len(maybe) + 2, 2 * len(maybe) + 2))
    assert torch.equal(bits[0], before[0]) and torch.equal(bits[len(maybe) + 1], before[1])
    assert torch.equal(bits[len(maybe) + 2], before[2])
    # after the whole choice only the stop token is allowed
    last = bits[len(maybe)]
    allowed = [t for t in range(llm.engine.runner.vocab_size) if last[t // 32] >> (t % 32) & 1]
    assert eos in allowed and all(t in tok.all_special_ids for t in allowed)
    bits2, _ = mask.bitmask(seqs)
    assert torch.equal(bits2[:3], before)
    mask.drop([s.seq_id for s in seqs])


# ---- LoRA ------------------------------------------------------------------------------------
def test_lora_adapter_with_speculation_equals_without(tiny_model_dir, tmp_path):
    """early_exit drafts with the request's adapter (it is the same model, cut short); ngram
    drafts from the text. Greedy output with the adapter equals the non-speculative one."""
    from lora_testutil import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a1", seed=1)
    kw = dict(model=str(tiny_model_dir), quantization="none", enable_lora=True, max_loras=2,
              lora_modules=[f"a1={adapter}"], max_model_len=512, kv_cache_memory="64MiB")
    prompts = ["a b c d e f g a b c d e f g a b c", "the cat sat on the mat. the cat sat on the", "hello"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(**kw)
    want = _run(plain, prompts, params, lora_request=LoRARequest("a1"))
    assert want != _run(plain, prompts, params)   # the adapter matters
    for spec in (NGRAM, EARLY_EXIT_TINY):
        llm = LLM(speculative_config=spec, **kw)
        assert _run(llm, prompts, params, lora_request=LoRARequest("a1")) == want, spec
        if spec == EARLY_EXIT_TINY:   # (the random model's text seldom repeats: prompt lookup rarely drafts)
            assert llm.engine.get_stats()["spec_decode_num_drafts_total"] > 10


# ---- AdaptiVocab -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patched_tiny(tmp_path_factory):
    from adaptivocab.patch_model import patch_model
    from adaptivocab_testutil import small_patch_tokenizer, tiny_llama_dir

    root = tmp_path_factory.mktemp("patched")
    return patch_model(tiny_llama_dir(root / "base"), small_patch_tokenizer(), root / "patched", init="exp")


@pytest.mark.parametrize("spec", [NGRAM, EARLY_EXIT_TINY])
def test_patched_tokenizer_with_speculation_equals_without(patched_tiny, spec):
    """A patched vocabulary's n-tokens are drafted and verified like any token."""
    from adaptivocab_testutil import HELDOUT_MODULES, stdlib_file

    code = stdlib_file(HELDOUT_MODULES[0]).read_text()[:600]
    prompts = [code + code[:200], "def f(x):\n    return x\n\ndef g(x):\n    return", "hello"]
    kw = dict(model=str(patched_tiny), max_model_len=1024, kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = LLM(**kw)
    llm = LLM(speculative_config=spec, **kw)
    assert llm.get_tokenizer().ngrams   # the engine serves the patched tokenizer
    got = _run(llm, prompts, params)
    assert got == _run(plain, prompts, params)
    assert llm.engine.get_stats()["spec_decode_num_drafts_total"] > 0
    # a constrained request over the patched vocabulary speculates too
    so = SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(regex=r"(def [a-z]{1,8}\(\): pass\n){1,3}"))
    assert _run(llm, ["def a(): pass\ndef b(): pass\n"], so) == _run(plain, ["def a(): pass\ndef b(): pass\n"], so)
