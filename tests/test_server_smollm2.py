"""A few checks of the server on the real embedded model (SmolLM2-135M-Instruct),
started with no --model flag (the default), against the offline engine."""
from __future__ import annotations

import math

import openai
import pytest

from server_harness import engine_flags, running_server

pytestmark = pytest.mark.slow
ENGINE_ARGS = dict(kv_cache_memory="256MiB", max_model_len=1024)


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    # no --model: the default (embedded SmolLM2)
    with running_server(engine_flags(ENGINE_ARGS), tmp_path_factory.mktemp("smollm2-server") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    from sarathi import LLM

    return LLM(**ENGINE_ARGS)


def test_default_model_chat_equals_offline_and_streams(client, offline):
    from sarathi import SamplingParams

    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert resp.choices[0].message.content == want.text
    # A real answer (the default runs the Q4_1 blocks with int8 activations, so the text can differ
    # from fp32's; tests/test_quantized_engine.py checks quality)
    assert "Paris" in want.text and (len(want.token_ids) == 16 or want.finish_reason == "stop")
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text


def test_completion_logprobs_and_utf8_echo_equal_offline(client, offline):
    from sarathi import SamplingParams

    model = client.models.list().data[0].id
    prompt = "Un café à Paris ☕ costs"
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                     echo=True)
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=2,
                                                     prompt_logprobs=2))[0]
    choice = resp.choices[0]
    assert choice.text == prompt + want.outputs[0].text
    lp = choice.logprobs
    n_prompt = len(want.prompt_token_ids)
    for i, tid in enumerate(want.prompt_token_ids[1:], start=1):
        assert math.isclose(lp.token_logprobs[i], want.prompt_logprobs[i][tid].logprob, abs_tol=1e-5)
    for j, (tid, step) in enumerate(zip(want.outputs[0].token_ids, want.outputs[0].logprobs)):
        assert math.isclose(lp.token_logprobs[n_prompt + j], step[tid].logprob, abs_tol=1e-5)
        assert len(lp.top_logprobs[n_prompt + j]) in (2, 3)


def test_default_model_runs_quantized_and_says_so(server):
    """The embedded Q4_1 GGUF is served in its own blocks by default; /metrics names format and ISA."""
    import re

    import httpx

    text = httpx.get(server.base_url + "/metrics").text
    m = re.search(r'^sarathi:model_info\{(.*)\} 1\.0$', text, re.M)
    assert m, "model_info missing from /metrics"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    assert labels["quantization"] == "gguf" and "gguf Q4_1" in labels["weight_formats"]
    assert labels["kernel_isa"] in ("avx512vnni", "avx2", "scalar")
