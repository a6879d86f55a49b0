"""Teacher targets for patched models: exact against brute force, sparse storage, the distillation loss."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaptivocab import PatchTokenizer
from adaptivocab.teacher import (NgramTrie, TargetCache, TeacherConfig, block_targets, cache_header,
                                 patched_distribution, teacher_loss)
from adaptivocab_testutil import small_patch_tokenizer


@pytest.fixture(scope="module")
def setup():
    """A tokenizer with 6 hand-made n-grams over 4 base tokens, and a tiny model that favours those tokens."""
    base_tok = small_patch_tokenizer()
    a, b, c, d = base_tok.base.backend_tokenizer.encode("def foo(self", add_special_tokens=False).ids[:4]
    other = base_tok.base.backend_tokenizer.encode(" return", add_special_tokens=False).ids[0]
    # (b, c, d) without (b, c); (a, b, c) on top of (a, b); a 4-gram over two shorter ones.
    table = {49100: (a, b), 49101: (a, b, c), 49102: (b, c, d), 49103: (c, c), 49104: (a, c, d), 49105: (d, a, b, c)}
    tok = PatchTokenizer(base_tok._base_json, base_tok.base_config, table)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    head = torch.nn.Linear(32, 49152, bias=True)
    with torch.no_grad():  # most of the mass on the alphabet, and context-dependent
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.weight[[a, b, c, d, other]] *= 6.0
        head.bias[[a, b, c, d, other]] = 11.0
    model.lm_head = head
    return tok, model, (a, b, c, d), other


def brute_force(tok, model, context, alphabet, other):
    """P(first patched token = s) by enumerating every continuation over the alphabet (others stop a match)."""
    def probs(seq):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        logits[sorted(tok.ngrams)] = float("-inf")
        return torch.softmax(logits, -1)

    max_n = max(len(v) for v in tok.ngrams.values())
    target = torch.zeros(49152, dtype=torch.float64)
    root = probs(context)
    target += root
    target[list(alphabet)] = 0.0

    def walk(prefix, mass):
        if len(prefix) == max_n:
            target[tok._merge(list(prefix) + [other])[0]] += mass
            return
        p = probs(context + list(prefix))
        stop = 1.0 - p[list(alphabet)].sum().item()   # any other token: no n-gram continues
        target[tok._merge(list(prefix) + [other])[0]] += mass * stop
        for x in alphabet:
            walk(prefix + (x,), mass * p[x].item())

    for x in alphabet:
        walk((x,), root[x].item())
    return target


def test_trie_structure(setup):
    tok, _, (a, b, c, d), _ = setup
    trie = NgramTrie(tok.ngrams)
    abc = trie.node[(a, b, c)]
    assert trie.ngram_id[abc] == 49101 and trie.fallback[abc] == 49100
    bcd = trie.node[(b, c, d)]
    assert trie.ngram_id[bcd] == 49102 and trie.fallback[bcd] == b     # (b, c) is not in the table
    assert trie.ngram_id[trie.node[(b, c)]] == -1 and trie.has_children[trie.node[(b, c)]]
    assert trie.fallback[trie.node[(d, a, b, c)]] == d               # no shorter table n-gram starts with d
    assert trie.max_depth == 4


def test_full_expansion_equals_brute_force(setup):
    tok, model, alphabet, other = setup
    a, b, c, d = alphabet
    block = [other, a, 49100, c, d, 49103, other, a, 49105, b, other]   # patched ids, n-tokens included
    cfg = TeacherConfig(top_k=64, expand_per_position=1000.0, min_mass=0.0)
    t = block_targets(model, tok, NgramTrie(tok.ngrams), block, cfg)
    assert t["uncovered"].abs().max().item() < 1e-12                 # everything was evaluated
    base = [x for p in block for x in tok.ngrams.get(p, (p,))]
    starts = np.cumsum([0] + [len(tok.ngrams.get(p, (p,))) for p in block])
    for row in (0, 2, 4, 7, 9):                                      # target for patched token row + 1
        exact = brute_force(tok, model, base[: starts[row + 1]], alphabet, other)
        dense = torch.zeros(49152, dtype=torch.float64)
        dense[t["idx"][row].long()] = t["prob"][row].double()
        assert abs(exact.sum().item() - 1) < 1e-9
        top = t["idx"][row].long()
        assert torch.allclose(dense[top], exact[top], atol=2e-6), row
        assert abs(t["rest"][row].item() - (1 - exact[top].sum().item())) < 1e-5
        # the n-tokens get real mass: this is what one-hot targets never say
        assert exact[[49100, 49101, 49102, 49103, 49104, 49105]].sum() > 0.05


def test_unevaluated_prefixes_leave_exact_coarser_targets(setup):
    """With no off-text prefix evaluated, every listed probability is still the exact one; what is
    not known (a prefix's split between its shorter token and its n-grams) goes unlisted, into rest."""
    tok, model, alphabet, other = setup
    a, b, c, d = alphabet
    block = [other, a, b, other, c, c, d, other]
    trie = NgramTrie(tok.ngrams)
    full = block_targets(model, tok, trie, block, TeacherConfig(top_k=64, expand_per_position=1000.0, min_mass=0.0))
    none = block_targets(model, tok, trie, block, TeacherConfig(top_k=16, expand_per_position=0.0))
    assert int(none["evaluated"][1]) == 0 and int(full["evaluated"][1]) > 0
    assert none["uncovered"].sum() > 0.01
    compared = 0
    for row in range(len(block) - 1):
        for t in (full, none):
            assert abs(t["prob"][row].sum().item() + t["rest"][row].item() - 1) < 1e-5
        exact = dict(zip(full["idx"][row].tolist(), full["prob"][row].tolist()))
        for i, p in zip(none["idx"][row].tolist(), none["prob"][row].tolist()):
            if p > 1e-6 and i in exact:
                assert abs(p - exact[i]) < 2e-6, (row, i)
                compared += 1
        assert none["rest"][row] >= none["uncovered"][row] - 1e-6
    assert compared > 20


def test_patched_distribution_sums_to_one_with_partial_conditionals(setup):
    tok, _, (a, b, c, d), _ = setup
    trie = NgramTrie(tok.ngrams)
    rng = np.random.default_rng(0)
    root = rng.dirichlet(np.ones(49152) * 0.01)
    root[sorted(tok.ngrams)] = 0
    root /= root.sum()
    u = trie.node[(a,)]
    cond = {u: rng.dirichlet(np.ones(len(trie.children[u])))}
    target, unc, unsure = patched_distribution(trie, root, cond)
    assert abs(target.sum() - 1) < 1e-12 and target.min() >= 0
    # the mass of (a, b) is P(a) * P(b | a) minus what continues into (a, b, c), which was not evaluated
    ab = trie.node[(a, b)]
    assert target[49100] == pytest.approx(root[a] * cond[u][trie.child_index[ab]])
    assert unc >= root[a] * cond[u][trie.child_index[ab]] - 1e-15
    # unsure: the holders of the prefixes not evaluated ((a, b): its n-token; (a, c): a; (b), (c), (d):
    # themselves) and every n-token below them; the other 49k tokens are listed exactly
    assert set(unsure.tolist()) == {a, b, c, d, 49100, 49101, 49102, 49103, 49104, 49105}
    with pytest.raises(ValueError, match="parent"):
        patched_distribution(trie, root, {trie.node[(a, b)]: np.ones(1)})


def test_teacher_loss_matches_dense_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40)
    target = torch.softmax(torch.randn(3, 5, 40) * 3, -1)
    top = torch.topk(target, 8)
    rest = 1 - top.values.sum(-1)
    loss = teacher_loss(logits, top.indices.int(), top.values, rest)
    logq = torch.log_softmax(logits, -1)
    q = logq.exp()
    q_rest = 1 - q.gather(-1, top.indices).sum(-1)
    want = -((top.values * logq.gather(-1, top.indices)).sum(-1) + rest * q_rest.log()).mean()
    assert torch.allclose(loss, want)
    full = teacher_loss(logits, torch.arange(40).expand(3, 5, 40).int(), target, torch.zeros(3, 5))
    assert torch.allclose(full, -(target * logq).sum(-1).mean(), atol=1e-6)


def test_cache_refuses_other_settings(setup, tmp_path):
    tok, _, _, _ = setup
    blocks = np.arange(20, dtype=np.int64).reshape(2, 10)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    header = cache_header(base_dir, tok, blocks, TeacherConfig())
    cache = TargetCache(tmp_path / "t", header)
    cache.save(1, {"rest": torch.zeros(9)})
    assert cache.blocks() == [1] and cache.has(1) and not cache.has(0)
    assert TargetCache(tmp_path / "t", header).load(1)["rest"].shape == (9,)
    other = cache_header(base_dir, tok, blocks + 1, TeacherConfig())
    with pytest.raises(ValueError, match="blocks"):
        TargetCache(tmp_path / "t", other)
    with pytest.raises(ValueError, match="top_k"):
        TeacherConfig(top_k=0)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        TargetCache(tmp_path / "junk", header)
    (tmp_path / "t" / "block-0000001.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        cache.load(1)


def test_distillation_lowers_the_teacher_loss(tmp_path):
    """teacher-targets then finetune with them, end to end on a tiny model: the CE to the targets falls."""
    import json

    from adaptivocab.finetune import FinetuneConfig, finetune
    from adaptivocab.patch_model import patch_model
    from adaptivocab.teacher import make_targets
    from adaptivocab_testutil import stdlib_file, tiny_llama_dir

    base = tiny_llama_dir(tmp_path / "base", tie=False)
    teacher = LlamaForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        teacher.lm_head.weight *= 60.0   # a confident teacher, so its targets say something
    teacher.save_pretrained(str(base))
    patched = patch_model(base, small_patch_tokenizer(), tmp_path / "patched", init="exp")
    corpus = [stdlib_file("glob.py")]
    stats = make_targets(patched, corpus, tmp_path / "targets", TeacherConfig(top_k=16, expand_per_position=2.0),
                         seq_len=32, max_blocks=3, max_minutes=5)
    assert stats["computed"] == 3 and stats["cached_blocks"] == 3
    again = make_targets(patched, corpus, tmp_path / "targets", TeacherConfig(top_k=16, expand_per_position=2.0),
                         seq_len=32, max_blocks=3, max_minutes=5)
    assert again["computed"] == 0                                     # cached
    with pytest.raises(ValueError, match="other settings"):
        make_targets(patched, corpus, tmp_path / "targets", TeacherConfig(top_k=8), seq_len=32, max_blocks=3)
    cfg = FinetuneConfig(train=["lm_head", "last_layer"], seq_len=32, batch_size=2, lr=3e-3, max_tokens=64 * 12,
                         eval_every=1000, save_every=1000, warmup_steps=1, teacher_targets=str(tmp_path / "targets"),
                         teacher_weight=1.0)
    out = finetune(patched, corpus, tmp_path / "ft", cfg)
    curve = json.loads((out / "finetune_log.json").read_text())
    assert curve["step"] == 12
    ft = LlamaForCausalLM.from_pretrained(str(out)).eval()
    before = LlamaForCausalLM.from_pretrained(str(patched), tie_word_embeddings=False).eval()
    cache = TargetCache(tmp_path / "targets", json.loads((tmp_path / "targets" / "teacher_targets.json").read_text()))
    from adaptivocab.corpus import corpus_blocks, read_corpus
    tok = PatchTokenizer.from_pretrained(patched)
    blocks = corpus_blocks(tok, read_corpus(corpus), 32)

    def kd(model):
        with torch.no_grad():
            losses = []
            for b in cache.blocks():
                t = cache.load(b)
                logits = model(input_ids=torch.from_numpy(blocks[b])[None]).logits[0, :-1]
                losses.append(teacher_loss(logits, t["idx"], t["prob"], t["rest"]).item())
        return sum(losses) / len(losses)

    assert kd(ft) < kd(before) - 0.1
    # a fine-tune on another corpus cannot use these targets
    with pytest.raises(ValueError, match="blocks"):
        finetune(patched, [stdlib_file("shlex.py")], tmp_path / "ft2", cfg)
