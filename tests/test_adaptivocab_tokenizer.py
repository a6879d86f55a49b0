"""PatchTokenizer on SmolLM2's tokenizer, built from Python standard library sources."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptivocab import PATCH_TOKENIZER_FILE, PatchTokenizer, is_patch_tokenizer_dir
from adaptivocab_testutil import HELDOUT_MODULES, TRAIN_MODULES, small_patch_tokenizer, smollm2_dir, stdlib_file, stdlib_text


@pytest.fixture(scope="module")
def tok():
    return small_patch_tokenizer()


def base_ids(tok, text):
    return tok.base.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_build_chooses_ngrams_that_take_unused_ids(tok):
    assert len(tok.ngrams) == 300
    train_ids = set()
    for name in TRAIN_MODULES:
        train_ids.update(base_ids(tok, stdlib_file(name).read_text()))
    special = set(tok.all_special_ids)
    for new_id, parts in tok.ngrams.items():
        assert new_id not in train_ids and new_id not in special  # took a base id the corpus never uses
        assert all(p not in tok.ngrams for p in parts)  # components survive
    # The first choice is the biggest saver, and it is really used on the training text.
    text = stdlib_text(TRAIN_MODULES[:2])
    first = next(iter(tok.ngrams))
    assert first in tok.encode(text)


def test_round_trip_real_text(tok):
    for name in HELDOUT_MODULES + TRAIN_MODULES[:2]:
        text = stdlib_file(name).read_text()
        ids = tok.encode(text)
        assert tok.decode(ids) == text


def test_heldout_patched_never_longer_and_shorter_overall(tok):
    total_base = total_patched = 0
    for name in HELDOUT_MODULES:
        text = stdlib_file(name).read_text()
        b, p = len(base_ids(tok, text)), len(tok.encode(text, add_special_tokens=False))
        assert p <= b, name
        total_base, total_patched = total_base + b, total_patched + p
    assert total_patched < 0.95 * total_base


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80) | st.text(alphabet="def (self, x): return \n    ._é中🙂", max_size=120))
def test_round_trip_property(tok, text):
    if tok.base.decode(base_ids(tok, text)) != text:
        return  # only strings the base tokenizer itself round-trips
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="self.x = é中🙂 return\n", min_size=1, max_size=40))
def test_prefix_decode_is_text_prefix_or_ends_in_replacement_char(tok, text):
    # What the engine's incremental detokeniser relies on: any window decodes to a prefix
    # of the text, except a trailing U+FFFD when it stops inside a multi-byte character.
    ids = tok.encode(text, add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        part = tok.decode(ids[:k])
        assert text.startswith(part) or (part.endswith("\ufffd") and text.startswith(part.rstrip("\ufffd")))


def test_ngram_ending_inside_a_character_decodes_with_replacement_char(tok):
    # SmolLM2 splits the 4-byte emoji into two byte-level tokens; an n-token made of
    # "value" and the emoji's first half ends inside the character.
    text = "self.value🙂\n"
    base = base_ids(tok, text)
    value_at = tok.base.convert_ids_to_tokens(base).index("value")
    ngram = (base[value_at], base[value_at + 1])
    patched = PatchTokenizer(tok._base_json, tok.base_config, {49100: ngram})
    ids = patched.encode(text, add_special_tokens=False)
    assert 49100 in ids and patched.decode(ids) == text
    upto = ids.index(49100) + 1
    assert patched.decode(ids[:upto]) == "self.value\ufffd"  # held back by the engine until complete
    assert patched.decode(ids[:upto + 1]) == "self.value🙂"


def test_merges_never_cross_special_tokens(tok):
    text = "return self<|im_end|>\n<|im_start|>assistant\ndef f(self):"
    ids = tok.encode(text)
    specials = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")}
    assert specials <= set(ids)
    for t in ids:
        assert not (tok.is_ngram(t) and set(tok.ngrams[t]) & specials)
    assert tok.decode(ids) == text


def test_chat_template_encodes_segments_between_special_tokens(tok):
    messages = [{"role": "user", "content": "def f(self):\n    return self"},
                {"role": "assistant", "content": "    return self.x"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.base.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    # Encoding each piece between special tokens separately gives the same ids.
    special_ids = set(tok.all_special_ids)
    expected, segment = [], []
    for t in base_ids(tok, rendered):
        if t in special_ids:
            expected += tok.patch_ids(segment) + [t]
            segment = []
        else:
            segment.append(t)
    expected += tok.patch_ids(segment)
    assert ids == expected
    assert tok.decode(ids) == rendered


def test_hf_interface(tok):
    assert tok.vocab_size == tok.base.vocab_size and len(tok) == len(tok.base)
    assert tok.eos_token_id == tok.base.eos_token_id and tok.pad_token_id == tok.base.pad_token_id
    assert tok.bos_token_id == tok.base.bos_token_id and tok.chat_template == tok.base.chat_template
    batch = tok(["def f(self):", "return"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum().item() == len(tok.encode("return"))
    assert tok.batch_decode(batch["input_ids"][:1].tolist()) == ["def f(self):"]
    first = next(iter(tok.ngrams))
    assert tok.convert_ids_to_tokens(first) == "".join(tok.base.convert_ids_to_tokens(list(tok.ngrams[first])))
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(first)) == first
    assert tok("return self")["input_ids"] == tok.encode("return self")


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert is_patch_tokenizer_dir(tmp_path) and not is_patch_tokenizer_dir(tmp_path / "missing")
    saved = json.loads((tmp_path / PATCH_TOKENIZER_FILE).read_text())
    assert saved["removed_ids"] == sorted(tok.ngrams)
    loaded = PatchTokenizer.from_pretrained(tmp_path)
    assert loaded.ngrams == tok.ngrams and list(loaded.ngrams) == list(tok.ngrams)
    text = stdlib_file(HELDOUT_MODULES[0]).read_text()
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_mismatched_base_tokenizer_is_a_clear_error(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    other = json.loads((smollm2_dir() / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    a, b = "Ġthe", "Ġand"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different base tokenizer"):
        PatchTokenizer.from_pretrained(tmp_path)


def test_bad_corpus_and_sizes_are_clear_errors(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    binary.write_bytes("caf\xe9 au lait".encode("latin-1"))
    base = str(smollm2_dir())
    with pytest.raises(ValueError, match="empty"):
        PatchTokenizer.build(base, [empty], num_new_tokens=5, show_progress=False)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        PatchTokenizer.build(base, [binary], num_new_tokens=5, show_progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        PatchTokenizer.build(base, [tmp_path / "nope.txt"], num_new_tokens=5, show_progress=False)
    with pytest.raises(ValueError, match="larger than the"):
        PatchTokenizer.build(base, [stdlib_file("glob.py")], num_new_tokens=10**6, show_progress=False)
    with pytest.raises(ValueError, match="no patch_tokenizer.json"):
        PatchTokenizer.from_pretrained(tmp_path)


def test_cli_build_writes_a_loadable_tokenizer(tmp_path):
    from adaptivocab.__main__ import main

    out = tmp_path / "pt"
    main(["build", "--base", str(smollm2_dir()), "--corpus", str(stdlib_file("glob.py")),
          "--num-new-tokens", "10", "--out", str(out)])
    assert len(PatchTokenizer.from_pretrained(out).ngrams) == 10
    with pytest.raises(SystemExit):
        main(["build", "--base", str(tmp_path / "missing-model"), "--corpus", str(stdlib_file("glob.py")),
              "--num-new-tokens", "10", "--out", str(out)])
