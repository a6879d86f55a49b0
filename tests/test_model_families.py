"""Families beyond Llama (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3) match transformers.

Each family is a tiny random model built with transformers' own config class and saved as
safetensors. Our engine serves it with chunked prefill mixed with decodes; greedy tokens must
equal transformers' and logprobs agree within 1e-4, over prompts longer than the sliding
window where the family has one, batched and each alone.
"""
from __future__ import annotations

import shutil

import pytest

from conftest import hf_greedy
from sarathi import LLM, SamplingParams

WINDOW = 16
# name -> (transformers config class, model class, config fields). Heads, windows and RoPE are
# chosen so every family option is exercised: biases, q/k norms, (1 + w) norms, soft-caps,
# query_pre_attn_scalar != head_dim, local/global RoPE bases, partial rotary, LongRoPE's factors.
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(  # layers from max_window_layers on slide
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma2-scalar": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=20, sliding_window=WINDOW, attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=WINDOW, max_position_embeddings=16384,
        original_max_position_embeddings=4096,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [4.0] * 4})),
}
BASE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rms_norm_eps=1e-6)
PROMPTS = [list(range(300, 370)), [5, 6, 7, 8, 9], list(range(1000, 1041))]  # 70 and 41 > WINDOW
MAX_NEW = 12


def make_family(name: str, out, tokenizer_dir, seed: int = 0):
    """Save the tiny random `name` model (HF safetensors + SmolLM2's tokenizer); returns the HF model."""
    import torch
    import transformers

    config_cls, model_cls, fields = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **fields})
    model = getattr(transformers, model_cls)(cfg).float().eval()
    if name.startswith("gemma"):  # HF initialises Gemma's norms to 0 (scale 1): make them matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, out / f)
    return model


_CACHE = {}


@pytest.fixture(scope="module")
def family(tmp_path_factory, smollm2_dir):
    """name -> (model directory, HF greedy references for PROMPTS)."""

    def get(name):
        if name not in _CACHE:
            d = tmp_path_factory.mktemp(name)
            hf = make_family(name, d, smollm2_dir)
            _CACHE[name] = d, [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]
        return _CACHE[name]

    return get


def greedy():
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)


def run(llm, prompts):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy())
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


def assert_matches(got, refs, tol=1e-4):
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, refs):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < tol


@pytest.mark.parametrize("backend", ["vattention", "paged"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_hf(name, backend, family):
    d, refs = family(name)
    llm = LLM(model=str(d), kv_cache_backend=backend, chunk_size=16, max_model_len=256, max_num_seqs=4,
              kv_cache_memory="32MiB", block_size=16, page_size=4096)
    batched = run(llm, PROMPTS)  # prefill chunks of 16 beside the other prompts' decodes
    assert_matches(batched, refs)
    for prompt, want in zip(PROMPTS, batched):  # batch = alone
        assert_matches(run(llm, [prompt]), [want], tol=1e-5)


def test_windows_reach_the_kv_backend(family):
    """The window really cuts: the same model without it gives other tokens on a long prompt."""
    import json

    d, _ = family("mistral")
    llm = LLM(model=str(d), max_model_len=256, kv_cache_memory="32MiB")
    spec = llm.engine.runner.kv_spec
    assert spec.sliding_windows == (WINDOW, WINDOW)
    cfg = json.loads((d / "config.json").read_text())
    no_window = d.parent / "mistral-no-window"
    shutil.copytree(d, no_window)
    (no_window / "config.json").write_text(json.dumps(dict(cfg, sliding_window=None)))
    full = LLM(model=str(no_window), max_model_len=256, kv_cache_memory="32MiB")
    assert run(full, PROMPTS[:1])[0][1] != run(llm, PROMPTS[:1])[0][1]


def test_gemma3_layers(family):
    d, _ = family("gemma3")
    args = LLM(model=str(d), max_model_len=128, kv_cache_memory="16MiB").engine.runner.model.args
    assert args.sliding_windows == (WINDOW, WINDOW, 0)
    assert args.layer_rope(0).theta == 10000.0 and args.layer_rope(2).theta == 1_000_000.0
    assert args.layer_rope(2).scaling["rope_type"] == "linear"


@pytest.mark.parametrize("backend, caching", [("vattention", False), ("vattention", True), ("paged", True)])
def test_window_releases_blocks(backend, caching, family):
    """Mistral (every layer slides): blocks behind the window leave the sequence's table, so
    a long sequence holds window-sized memory. Without prefix caching they go straight back
    to the kernel's pool (its mapped bytes stop growing); with it they stay cached, free for
    the scheduler and evicted on demand. The tokens stay transformers'."""
    d, refs = family("mistral")
    llm = LLM(model=str(d), kv_cache_backend=backend, chunk_size=16, max_model_len=256, max_num_seqs=2,
              kv_cache_memory="4MiB", block_size=16, page_size=4096, async_kv_mapping=False,
              enable_prefix_caching=caching)
    eng = llm.engine
    assert eng.kv.window == WINDOW
    prompt = list(range(300, 480))  # 180 tokens: 12 blocks of 16, or 6 pages of 32 (2 KV heads x 16 dims x fp32)
    eng.add_request("long", None, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                    prompt_token_ids=prompt)
    held, mapped = [], []
    while eng.has_unfinished_requests():
        eng.step()
        for seq in eng.scheduler.running:
            held.append(sum(b >= 0 for b in eng.kv.block_table(seq.seq_id)))
            mapped.append(eng.runner.kv_stats().get("kv_bytes_mapped"))
        eng.kv.check_invariants()
    # Admission takes blocks for the whole prompt; after its 12 chunks the window (16) and the
    # next token span at most 2 blocks of 16 tokens (2 pages of 32) where 220 tokens take 14 (7).
    assert len(held) == 12 + 38 and max(held[12:]) <= 2  # the last token finishes it
    assert (eng.kv.num_cached_blocks > 0) == caching
    if backend == "vattention":
        page = eng.runner.kv_stats()["kv_page_size"]
        per_block = page * 2 * 2  # one page in each of 2 layers' K and V
        if caching:
            assert mapped[-1] >= 6 * per_block  # the prompt's pages stay as cache
        else:
            assert max(mapped[12:]) <= 2 * per_block
        assert eng.runner.kv_stats()["kv_bytes_released"] == 4 * page * 6  # 6 of its 7 pages, in 4 regions
    assert_matches(run(llm, PROMPTS), refs)
    assert_matches(run(llm, PROMPTS), refs)  # again, on whatever the cache kept
    if backend == "vattention":
        eng.runner.kv_backend.cache.check_invariants()  # a freed slot keeps no released pages
