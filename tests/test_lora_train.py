"""LoRA fine-tuning (peft + transformers Trainer) and the train -> merge -> quantize -> serve chain."""
from __future__ import annotations

import json
import random

import pytest
import torch

from sarathi import LLM, LoRARequest, SamplingParams
from sarathi.lora_training.__main__ import main as lora_main
from sarathi.lora_training.data import IGNORE, DataError, encode_examples, read_jsonl

WORDS = "the quick brown fox jumps over a lazy dog while python lists dicts tuples and sets".split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rnd = random.Random(0)
    path = tmp_path_factory.mktemp("lora-data") / "train.jsonl"
    with path.open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(50))}) + "\n")
        for _ in range(8):
            f.write(json.dumps({"prompt": "Q: " + rnd.choice(WORDS), "completion": " A: " + rnd.choice(WORDS)}) + "\n")
        for _ in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": "say " + rnd.choice(WORDS)},
                                             {"role": "assistant", "content": rnd.choice(WORDS)}]}) + "\n")
    return path


def _train(base, data, out, *extra):
    args = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--r", "4", "--lora-alpha", "8",
            "--batch-size", "4", "--logging-steps", "1", "--lr", "1e-2", "--lora-dropout", "0.1", *map(str, extra)]
    assert lora_main(args) == 0
    return json.loads((out / "train_summary.json").read_text())


def _losses(summary):
    return {h["step"]: h["loss"] for h in summary["history"] if "loss" in h}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "adapter"
    summary = _train(tiny_model_dir, data_file, out, "--max-steps", 6, "--eval-steps", 3, "--save-steps", 3)
    return out, summary


def test_training_writes_a_peft_adapter_and_learns(trained, tiny_model_dir):
    out, summary = trained
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob("*.bin"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    from lora_testutil import peft_model

    peft_model(tiny_model_dir, out)  # peft itself loads it
    losses = _losses(summary)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]
    assert all(h.get("tokens_per_s", 1) > 0 for h in summary["history"])


def test_resume_gives_the_same_loss_curve(trained, tiny_model_dir, data_file, tmp_path):
    _, straight = trained
    out = tmp_path / "resumed"
    first = _train(tiny_model_dir, data_file, out, "--max-steps", 6, "--eval-steps", 3, "--save-steps", 3,
                   "--stop-after-steps", 3)
    assert first["global_step"] == 3
    second = _train(tiny_model_dir, data_file, out, "--max-steps", 6, "--eval-steps", 3, "--save-steps", 3)
    assert second["resumed"] and second["global_step"] == 6
    combined = {**_losses(first), **_losses(second)}
    want = _losses(straight)
    assert sorted(combined) == sorted(want)
    for step in want:
        assert combined[step] == pytest.approx(want[step], rel=1e-4), step


def test_merge_equals_unmerged_then_quantize_and_serve(trained, tiny_model_dir, tmp_path):
    adapter, _ = trained
    merged = tmp_path / "merged"
    assert lora_main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    p = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    ids = [1, 200, 300, 400, 500]
    unmerged = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True,
                   lora_modules=[f"ft={adapter}"])
    a = unmerged.generate(prompt_token_ids=[ids], sampling_params=p, lora_request=LoRARequest("ft"))[0].outputs[0]
    b = LLM(model=str(merged), quantization="none").generate(prompt_token_ids=[ids], sampling_params=p)[0].outputs[0]
    base = unmerged.generate(prompt_token_ids=[ids], sampling_params=p)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.token_ids != base.token_ids
    for t, la, lb in zip(a.token_ids, a.logprobs, b.logprobs):
        assert abs(la[t].logprob - lb[t].logprob) <= 1e-4
    # ... -> sarathi quantize -> serve
    from sarathi.quantize.__main__ import main as quantize_main

    quantized = tmp_path / "merged-gptq"
    assert quantize_main(["--model", str(merged), "--method", "rtn", "--bits", "4", "--group-size", "32",
                          "--out", str(quantized), "--quiet"]) == 0
    q = LLM(model=str(quantized))
    assert q.engine.runner.quantization == "gptq"
    out = q.generate(prompt_token_ids=[ids], sampling_params=p)[0].outputs[0]
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("base_quantization", ["nf4", "int4"])
def test_qlora_on_a_4bit_base(tiny_model_dir, data_file, tmp_path, base_quantization):
    if base_quantization == "nf4":
        pytest.importorskip("bitsandbytes", reason="NF4 needs bitsandbytes (pip install -e '.[lora]')")
    out = tmp_path / base_quantization
    summary = _train(tiny_model_dir, data_file, out, "--max-steps", 4, "--eval-steps", 2, "--save-steps", 4,
                     "--base-quantization", base_quantization)
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]
    llm = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, lora_modules=[f"q={out}"])
    res = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=3),
                       lora_request=LoRARequest("q"))[0]
    assert len(res.outputs[0].token_ids) == 3


def test_int4_linear_is_close_and_small():
    from sarathi.lora_training.train import Int4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = Int4Linear(lin)
    err = (q.dequantize() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < 0.08
    assert q.packed.numel() * q.packed.element_size() == 128 * 64 // 2
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), x @ q.dequantize().t())


def test_data_formats_and_loss_masks(smollm2_dir, tmp_path):
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    tok = get_tokenizer(smollm2_dir)
    rows = [{"prompt": "Question: 2+2?", "completion": " Four"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Goodbye!"}]},
            {"text": "one two three " * 40}]
    ex = encode_examples(rows[:2], tok, max_length=256) + encode_examples(rows[2:], tok, max_length=32)
    pc = ex[0]
    n_prompt = len(tok.encode("Question: 2+2?"))
    assert pc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode([t for t in pc["labels"] if t != IGNORE]).startswith(" Four")
    chat = ex[1]
    learned = tok.decode([t for t in chat["labels"] if t != IGNORE])
    assert "Hello!" in learned and "Goodbye!" in learned and "Bye" not in learned.replace("Goodbye", "")
    assert "Be brief" not in learned
    windows = ex[2:]
    assert len(windows) > 1 and all(len(w["input_ids"]) <= 32 for w in windows)
    for bad, msg in [({"foo": 1}, "expected a 'text'"), ({"prompt": "x"}, "both be strings"),
                     ({"messages": [{"role": "user", "content": "x"}]}, "assistant turn"),
                     ({"text": ""}, "non-empty")]:
        with pytest.raises(DataError, match=msg):
            encode_examples([bad], tok, 32)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_jsonl(path)


def test_merge_refuses_pickle_adapters(tiny_model_dir, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (ad / "adapter_model.bin").write_bytes(b"not read")
    assert lora_main(["merge", "--base", str(tiny_model_dir), "--adapter", str(ad), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
