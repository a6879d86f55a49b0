"""A patched (AdaptiVocab) model through the OpenAI server, float and quantized: tokens, logprobs and
offsets are in patched units, streamed text equals the whole text, and everything decodes exactly."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from adaptivocab_testutil import small_patch_tokenizer, stdlib_text, tiny_llama_dir
from server_harness import engine_flags, running_server, sse_events

ENGINE_ARGS = dict(kv_cache_memory="64MiB", max_model_len=512)
# Python source: the stdlib n-tokens of small_patch_tokenizer occur in it.
PROMPT = "    def __init__(self, prog=None, usage=None, description=None):\n        self.prog = prog\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from adaptivocab.patch_model import patch_model
    from sarathi.quantize.core import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp("patched-serving")
    patched = patch_model(tiny_llama_dir(root / "base"), small_patch_tokenizer(), root / "patched", init="exp")
    calib = root / "calib.txt"
    calib.write_text(stdlib_text(["argparse.py"]))
    quantized = root / "patched-gptq"
    quantize(str(patched), quantized, QuantizeOptions(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=64),
             calib=str(calib), progress=False)
    return {"float": patched, "gptq": quantized}


@pytest.fixture(scope="module", params=["float", "gptq"])
def served(request, models, tmp_path_factory):
    from sarathi import LLM

    model_dir = models[request.param]
    log = tmp_path_factory.mktemp(f"server-{request.param}") / "server.log"
    with running_server(["--model", str(model_dir), *engine_flags(ENGINE_ARGS)], log) as proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield proc, client, LLM(model=str(model_dir), **ENGINE_ARGS)


def test_quantized_copy_keeps_the_patch_tokenizer(models):
    from adaptivocab import PatchTokenizer, is_patch_tokenizer_dir

    assert is_patch_tokenizer_dir(models["gptq"])
    cfg = json.loads((models["gptq"] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    tok = PatchTokenizer.from_pretrained(models["gptq"])
    assert tok.ngrams == small_patch_tokenizer().ngrams


def test_tokenize_and_detokenize_in_patched_units(served):
    proc, client, offline = served
    tok = offline.get_tokenizer()
    want = tok.encode(PROMPT, add_special_tokens=False)
    assert any(tok.is_ngram(t) for t in want)            # the prompt really uses n-tokens
    assert len(want) < len(tok.base(PROMPT, add_special_tokens=False)["input_ids"])
    r = httpx.post(proc.base_url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == want
    r = httpx.post(proc.base_url + "/detokenize", json={"tokens": want})
    assert r.json()["prompt"] == PROMPT


def test_completion_logprobs_offsets_add_up_and_stream_matches(served):
    from sarathi import SamplingParams

    proc, client, offline = served
    tok = offline.get_tokenizer()
    model = client.models.list().data[0].id
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=2, echo=True,
                                     extra_body={"ignore_eos": True})
    want = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    choice = resp.choices[0]
    assert choice.text == PROMPT + want.outputs[0].text
    assert want.outputs[0].text == tok.decode(want.outputs[0].token_ids)
    lp = choice.logprobs
    ids = want.prompt_token_ids + want.outputs[0].token_ids
    assert len(lp.tokens) == len(ids) == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # one entry per patched token; the texts tile the whole text and the offsets point at them
    assert "".join(lp.tokens) == choice.text
    for i, (token, offset) in enumerate(zip(lp.tokens, lp.text_offset)):
        assert choice.text[offset:offset + len(token)] == token, i
    for i, t in enumerate(ids):
        if tok.is_ngram(t):
            assert lp.tokens[i] == tok.decode([t]) and len(tok.ngrams[t]) >= 2
    assert sum(tok.is_ngram(t) for t in want.prompt_token_ids) >= 3
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1,
                                         stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == len(want.outputs[0].token_ids) and "".join(tokens) == want.outputs[0].text


def test_chat_streams_the_same_text(served):
    proc, client, offline = served
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write the __init__ of an argparse action."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
    text = whole.choices[0].message.content
    assert whole.usage.completion_tokens == 20
    with httpx.stream("POST", proc.base_url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": messages, "max_tokens": 20, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        events = list(sse_events(r.iter_lines()))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == text
