"""Patched models: embedding initialisation, directory layout, fine-tuning, metrics, serving parity."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptivocab import PatchTokenizer, is_patch_tokenizer_dir
from adaptivocab.finetune import FinetuneConfig, finetune
from adaptivocab.metrics import sequence_bits
from adaptivocab.patch_model import patch_model
from adaptivocab_testutil import HELDOUT_MODULES, read_config, small_patch_tokenizer, stdlib_file, tiny_llama_dir


@pytest.fixture(scope="module")
def base_tok():
    return small_patch_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "base", tie=True)


def hand_tokenizer(base_tok):
    """Two n-tokens with known components: (a, b) and (a, b, c)."""
    a, b, c = base_tok.base.backend_tokenizer.encode("def foo(self", add_special_tokens=False).ids[:3]
    assert len({a, b, c} | set(base_tok.all_special_ids)) == 3 + len(base_tok.all_special_ids)
    return PatchTokenizer(base_tok._base_json, base_tok.base_config, {49100: (a, b), 49101: (a, b, c)}), (a, b, c)


@pytest.mark.parametrize("init", ["exp", "mean", "first", "last"])
def test_init_rows_match_hand_computation(init, base_tok, tiny_dir, tmp_path):
    tok, (a, b, c) = hand_tokenizer(base_tok)
    out = patch_model(tiny_dir, tok, tmp_path / init, init=init)
    base_w = load_file(str(tiny_dir / "model.safetensors"))
    E = base_w["model.embed_tokens.weight"]
    H = base_w.get("lm_head.weight", E)  # tied base: the head is the embedding
    e = math.e
    expected = {
        "exp": ((E[a] + e * E[b]) / (1 + e), (e * H[a] + H[b]) / (1 + e),
                (E[a] + e * E[b] + e * e * E[c]) / (1 + e + e * e), (e * e * H[a] + e * H[b] + H[c]) / (1 + e + e * e)),
        "mean": ((E[a] + E[b]) / 2, (H[a] + H[b]) / 2, (E[a] + E[b] + E[c]) / 3, (H[a] + H[b] + H[c]) / 3),
        "first": (E[a], H[a], E[a], H[a]),
        "last": (E[b], H[b], E[c], H[c]),
    }[init]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    emb, head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    for got, want in zip((emb[49100], head[49100], emb[49101], head[49101]), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Every other row is the base's.
    keep = torch.ones(len(E), dtype=torch.bool)
    keep[[49100, 49101]] = False
    torch.testing.assert_close(emb[keep], E[keep])
    cfg = read_config(out)
    assert cfg["tie_word_embeddings"] is (init != "exp")  # exp rows differ in and out: untied
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))
    assert is_patch_tokenizer_dir(out) and (out / "tokenizer.json").is_file()
    assert PatchTokenizer.from_pretrained(out).ngrams == tok.ngrams


def test_patch_model_rejects_other_base_and_leaves_nothing(base_tok, tiny_dir, tmp_path):
    tok, _ = hand_tokenizer(base_tok)
    other = json.loads((tiny_dir / "tokenizer.json").read_text())
    other["model"]["vocab"]["Ġthe"], other["model"]["vocab"]["Ġand"] = (other["model"]["vocab"]["Ġand"],
                                                                      other["model"]["vocab"]["Ġthe"])
    bad_base = tmp_path / "other"
    bad_base.mkdir()
    for f in tiny_dir.iterdir():
        (bad_base / f.name).write_bytes(f.read_bytes())
    (bad_base / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different base tokenizer"):
        patch_model(bad_base, tok, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown init"):
        patch_model(tiny_dir, tok, tmp_path / "out", init="median")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_finetune_trains_chosen_parts_and_resumes(base_tok, tiny_dir, tmp_path):
    patched = patch_model(tiny_dir, base_tok, tmp_path / "patched", init="exp")
    corpus = [stdlib_file("glob.py")]
    cfg = FinetuneConfig(train=["embeddings", "lm_head", "last_layer"], seq_len=32, batch_size=2, lr=1e-2,
                         max_tokens=128, eval_every=1, eval_bytes=2000, save_every=1, warmup_steps=1)
    out = finetune(patched, corpus, tmp_path / "ft", cfg, eval_corpus=[stdlib_file("fnmatch.py")])
    state = json.loads((out / "finetune_log.json").read_text())
    assert state["step"] == 2 and state["tokens_seen"] == 128 and len(state["curve"]) == 3
    cfg.max_tokens = 256  # same run, bigger budget: continues from the checkpoint
    out = finetune(patched, corpus, tmp_path / "ft", cfg, eval_corpus=[stdlib_file("fnmatch.py")], overwrite=True)
    state = json.loads((out / "finetune_log.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 256 and [p["step"] for p in state["curve"]] == [0, 1, 2, 3, 4]
    before, after = load_file(str(patched / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert read_config(out)["tie_word_embeddings"] is False
    assert (tmp_path / "ft.checkpoint" / "optimizer.safetensors").is_file()
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))


def test_sequence_bits_equals_model_loss(base_tok, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    ids = base_tok.encode(stdlib_file("fnmatch.py").read_text()[:600], add_special_tokens=False)
    seq = torch.tensor([[0] + ids])
    with torch.no_grad():
        nats = model(input_ids=seq, labels=seq).loss.item() * len(ids)
    assert sequence_bits(model, ids, 0, window=len(ids) + 1) == pytest.approx(nats / math.log(2), rel=1e-4)
    # A short window loses context, so it can only be scored differently, never be empty.
    short = sequence_bits(model, ids, 0, window=16)
    assert short > 0 and short != pytest.approx(nats / math.log(2), rel=1e-6)


def test_evaluate_writes_report(base_tok, tiny_dir, tmp_path):
    from adaptivocab.evaluate import evaluate

    patched = patch_model(tiny_dir, base_tok, tmp_path / "p-exp", init="exp")
    report = evaluate(tiny_dir, [patched], [stdlib_file(n) for n in HELDOUT_MODULES], out=tmp_path / "eval",
                      max_bytes=1500, max_tokens=4, concurrency=[1, 2], speed="hf")
    assert 0.05 < report["token_reduction"]["p-exp"] < 0.9
    assert set(report["bits_per_byte"]) == {"base", "p-exp"}
    speed = report["speed"]["models"]["p-exp"]["2"]
    assert speed["tokens"] == 8 and 0 <= speed["ngram_share"] <= 1
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "eval.png").is_file()


def test_engine_greedy_matches_hf_on_patched_model(base_tok, tiny_dir, tmp_path):
    from sarathi import LLM, SamplingParams

    patched = patch_model(tiny_dir, base_tok, tmp_path / "patched", init="exp")
    prompts = ["def f(self):\n    return", "import os\nfrom pathlib import", "class A:\n    def __init__(self"]
    model = AutoModelForCausalLM.from_pretrained(str(patched), dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        ids = torch.tensor([base_tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=base_tok.pad_token_id)
        expected.append(out[0, ids.shape[1]:].tolist())
    llm = LLM(model=str(patched), dtype="float32", max_model_len=256)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    assert [o.outputs[0].text for o in outs] == [base_tok.decode(e) for e in expected]
