"""Structured outputs through the paths that run the same runner code with something more in the
step: LoRA adapters (the adapter's rows are masked like the base's), prefix caching (a request
whose prompt comes from the cache is constrained exactly as one that computed it). Ray replicas
are covered in test_ray_scaleout.py. Every output is checked by an independent checker (Python's
re, jsonschema), on the tiny random model: a random model left alone almost never writes a date
or a JSON object, so validity here is the constraint's doing."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lora_testutil import make_adapter
from sarathi import LLM, LoRARequest, SamplingParams
from sarathi.sampling_params import StructuredOutputsParams as SO

DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "ok": {"type": "boolean"}}, "required": ["id", "ok"]}
PROMPTS = ["The date of the launch was", "Write the record as JSON:", "Once upon a time in a small village"]


def constrained(seed=None):
    """A date regex and a JSON schema, greedy or sampled."""
    kw = dict(temperature=0.0) if seed is None else dict(temperature=1.0, seed=seed)
    return [SamplingParams(max_tokens=24, structured_outputs=SO(regex=DATE), **kw),
            SamplingParams(max_tokens=48, structured_outputs=SO(json=ITEM), **kw)]


def check(outs):
    """Outputs alternate date, JSON item; each must be in its language."""
    for i, out in enumerate(outs):
        text = out.outputs[0].text
        if i % 2 == 0:
            assert re.fullmatch(DATE, text), text
        else:
            assert out.outputs[0].finish_reason == "stop", text
            jsonschema.validate(json.loads(text), ITEM)


@pytest.fixture(scope="module")
def lora_llm(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("so-adapters")
    adapter = make_adapter(tiny_model_dir, root / "a1", seed=11)
    return LLM(model=str(tiny_model_dir), enable_lora=True, max_loras=2, lora_modules=[f"a1={adapter}"],
               kv_cache_memory="128MiB", max_model_len=512)


def test_constraints_hold_on_an_adapter_and_mixed_with_the_base(lora_llm):
    prompts = [p for p in PROMPTS for _ in range(2)]
    params = constrained() * len(PROMPTS)
    adapted = lora_llm.generate(prompts, params, lora_request=LoRARequest("a1"))
    base = lora_llm.generate(prompts, params)
    check(adapted)
    check(base)
    # The adapter changes what the constrained rows choose (its rows were really masked, not the base's).
    assert [o.outputs[0].token_ids for o in adapted] != [o.outputs[0].token_ids for o in base]
    # One batch mixing adapter and base rows gives each what it got alone (greedy).
    mixed = lora_llm.generate(prompts * 2, params * 2,
                              lora_request=[LoRARequest("a1")] * len(prompts) + [None] * len(prompts))
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in adapted + base]


def test_sampled_constraints_hold_on_an_adapter(lora_llm):
    outs = lora_llm.generate([p for p in PROMPTS for _ in range(2)], constrained(seed=5) * len(PROMPTS),
                             lora_request=LoRARequest("a1"))
    check(outs)


def test_constraints_hold_on_a_prefix_cache_hit(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), enable_prefix_caching=True, kv_cache_memory="128MiB",
              max_model_len=512)
    head = "A shared preamble that every request repeats word for word, long enough for blocks. " * 4
    prompts = [head + p for p in PROMPTS for _ in range(2)]
    params = constrained() * len(PROMPTS)
    first = [llm.generate([p], [sp])[0] for p, sp in zip(prompts, params)]   # the head gets cached
    again = llm.generate(prompts, params)
    check(first)
    check(again)
    assert all(o.num_cached_tokens > 0 for o in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
