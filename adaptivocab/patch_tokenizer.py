"""PatchTokenizer: a base BPE tokenizer whose rarely used tokens became domain n-grams.

Encoding runs the base tokenizer, splits any removed token into surviving pieces (by
undoing the BPE merge that made it), then merges runs of base tokens into n-tokens,
longest match first, left to right. Decoding expands n-tokens back to base tokens and
lets the base tokenizer decode, so `decode(encode(s)) == s` whenever the base round-trips
`s`, and a window that ends inside a multi-byte character decodes with a trailing U+FFFD
exactly as the base does. n-grams never contain special tokens, so merges never cross
special tokens or chat-template boundaries.

Saved as one JSON file (patch_tokenizer.json) holding the base tokenizer.json, its
special-token settings and chat template, the n-gram table and a fingerprint of the base.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from adaptivocab.corpus import read_corpus, split_documents
from adaptivocab.ngram import corpus_array, count_ngrams, select_ngrams

PATCH_TOKENIZER_FILE = "patch_tokenizer.json"
FORMAT = "adaptivocab.patch_tokenizer"
VERSION = 1
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def is_patch_tokenizer_dir(path: Union[str, Path]) -> bool:
    """True when `path` is a directory holding a PatchTokenizer (e.g. a patched model dir)."""
    return (Path(path) / PATCH_TOKENIZER_FILE).is_file()


def tokenizer_fingerprint(tokenizer_json: Union[str, dict]) -> str:
    """SHA-256 of the parts of a tokenizer.json that decide which id means what."""
    obj = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    parts = {k: obj.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class PatchTokenizer:
    """A tokenizer with the interface of an HF fast tokenizer over a patched vocabulary.

    `ngrams` maps each n-token id (the id of a removed base token) to the base ids it
    stands for. Build one with `PatchTokenizer.build`, load with `from_pretrained`.
    """

    def __init__(self, base_tokenizer_json: str, base_config: dict, ngrams: Dict[int, Sequence[int]],
                 build_info: Optional[dict] = None):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self._base_json = base_tokenizer_json
        self.base_config = dict(base_config)
        self.build_info = dict(build_info or {})
        backend = Tokenizer.from_str(base_tokenizer_json)
        backend.no_padding()
        backend.no_truncation()
        kwargs = {k: v for k, v in self.base_config.items() if k in _SPECIAL_NAMES and v is not None}
        self.base = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
        if self.base_config.get("chat_template"):
            self.base.chat_template = self.base_config["chat_template"]
        self._backend = self.base.backend_tokenizer
        self.fingerprint = tokenizer_fingerprint(base_tokenizer_json)
        self._special_ids = {i for i, t in self.base.added_tokens_decoder.items() if t.special}
        self.ngrams: Dict[int, Tuple[int, ...]] = {int(k): tuple(int(t) for t in v) for k, v in ngrams.items()}
        self._validate_ngrams()
        self._merge_table = {v: k for k, v in self.ngrams.items()}
        self._max_n = max((len(v) for v in self.ngrams.values()), default=0)
        self._first_ids = {v[0] for v in self.ngrams.values()}
        self._split = self._removed_pieces(set(self.ngrams))
        self.padding_side = "right"

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, base_tokenizer, corpus_files, num_new_tokens: int, max_ngram: int = 5, min_count: int = 2,
              show_progress: bool = True) -> "PatchTokenizer":
        """Choose `num_new_tokens` n-grams (2..max_ngram base tokens) that save the most tokens on the corpus.

        `base_tokenizer` is an HF fast tokenizer or a model directory / name. Each n-token
        takes the id of a base token the corpus never uses (highest ids first: BPE gives the
        rarest merges the highest ids); special tokens and tokens that no merge produces
        (the byte alphabet) are never removed, and the components of chosen n-grams are used
        by the corpus, so they are never removed either.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        if max_ngram < 2:
            raise ValueError(f"max_ngram must be >= 2, got {max_ngram}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        texts = read_corpus(corpus_files)  # first: a bad file is reported before any slow step
        hf = _as_hf_tokenizer(base_tokenizer)
        base_json = hf.backend_tokenizer.to_str()
        probe = cls(base_json, _base_config(hf), {})
        pieces = split_documents(texts)
        token_lists = probe._base_encode_many(pieces, show_progress=show_progress, desc="tokenizing corpus")
        ids = corpus_array(token_lists, probe._special_ids)
        vocab_len = probe._backend.get_vocab_size(with_added_tokens=True)
        used = np.bincount(ids[ids >= 0], minlength=vocab_len)
        removable = [i for i in range(vocab_len - 1, -1, -1)
                     if used[i] == 0 and i not in probe._special_ids and i in probe._merge_of]
        if num_new_tokens > len(removable):
            raise ValueError(
                f"num_new_tokens={num_new_tokens} is larger than the {len(removable)} base tokens that the "
                f"corpus never uses and that can be removed; ask for at most {len(removable)}")
        candidates = [count_ngrams(ids, n, min_count)
                      for n in tqdm(range(2, max_ngram + 1), desc="counting n-grams", disable=not show_progress)]
        chosen = select_ngrams(ids, candidates, num_new_tokens, min_count, show_progress)
        if not chosen:
            raise ValueError(
                f"no n-gram of 2..{max_ngram} base tokens occurs at least {min_count} times in the corpus "
                f"({len(ids)} base tokens); use a larger corpus or a lower min_count")
        ngrams = {removable[i]: c.tokens for i, c in enumerate(chosen)}
        info = {"num_requested": num_new_tokens, "num_chosen": len(chosen), "max_ngram": max_ngram,
                "min_count": min_count, "corpus_bytes": sum(len(t.encode("utf-8")) for t in texts),
                "corpus_base_tokens": int(sum(len(t) for t in token_lists)),
                "estimated_saved_tokens": int(sum(c.saved for c in chosen))}
        return cls(base_json, _base_config(hf), ngrams, info)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **_ignored) -> "PatchTokenizer":
        """Load from a directory holding patch_tokenizer.json (or from that file).

        When the directory also holds the model's tokenizer.json, it must be the base this
        patch tokenizer was built for.
        """
        path = Path(path)
        file = path / PATCH_TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no {PATCH_TOKENIZER_FILE} in {str(path)!r}")
        obj = read_json_file(file, "patch tokenizer file")
        _validate_saved(obj, file)
        base_json = json.dumps(obj["base_tokenizer"], ensure_ascii=False)
        if tokenizer_fingerprint(base_json) != obj["base_fingerprint"]:
            raise ValueError(f"{str(file)!r} is corrupt: its base tokenizer does not match its fingerprint")
        sibling = file.parent / "tokenizer.json"
        if sibling.is_file():
            check_same_base(obj["base_fingerprint"], sibling, what=str(file))
        ngrams = {e["id"]: e["tokens"] for e in obj["ngrams"]}
        try:
            return cls(base_json, obj["base_config"], ngrams, obj.get("build", {}))
        except Exception as e:  # the tokenizers library raises plain Exception for a bad tokenizer.json
            raise ValueError(f"{str(file)!r} is not a valid patch tokenizer: {e}") from None

    def save_pretrained(self, directory: Union[str, Path]) -> List[str]:
        """Write patch_tokenizer.json into `directory` (created if missing); JSON only."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        obj = {
            "format": FORMAT, "version": VERSION,
            "base_fingerprint": self.fingerprint,
            "base_config": self.base_config,
            "ngrams": [{"id": k, "tokens": list(v)} for k, v in self.ngrams.items()],
            "removed_ids": sorted(self.ngrams),
            "build": self.build_info,
            "base_tokenizer": json.loads(self._base_json),
        }
        out = directory / PATCH_TOKENIZER_FILE
        _atomic_write_text(out, json.dumps(obj, ensure_ascii=False))
        return [str(out)]

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **_ignored) -> List[int]:
        """Token ids of `text` in the patched vocabulary."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.patch_ids(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def patch_ids(self, base_ids: Iterable[int]) -> List[int]:
        """Turn base token ids into patched ids: split removed tokens, then merge n-grams."""
        ids: List[int] = []
        split = self._split
        for t in base_ids:
            pieces = split.get(t)
            if pieces is None:
                ids.append(t)
            else:
                ids.extend(pieces)
        return self._merge(ids)

    def _merge(self, ids: List[int]) -> List[int]:
        if not self._merge_table:
            return ids
        table, firsts, max_n = self._merge_table, self._first_ids, self._max_n
        out: List[int] = []
        i, n_ids = 0, len(ids)
        while i < n_ids:
            t = ids[i]
            if t in firsts:
                for n in range(min(max_n, n_ids - i), 1, -1):
                    new_id = table.get(tuple(ids[i:i + n]))
                    if new_id is not None:
                        out.append(new_id)
                        i += n
                        break
                else:
                    out.append(t)
                    i += 1
            else:
                out.append(t)
                i += 1
        return out

    def _base_encode_many(self, texts: List[str], show_progress: bool = False, desc: str = "tokenizing",
                          batch: int = 64) -> List[List[int]]:
        out = []
        for i in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", disable=not show_progress):
            out.extend(e.ids for e in self._backend.encode_batch(texts[i:i + batch], add_special_tokens=False))
        return out

    def encode_many(self, texts: List[str], show_progress: bool = False) -> List[List[int]]:
        """Patched ids of many texts (no special tokens added), base encoding in parallel."""
        base = self._base_encode_many(texts, show_progress, "tokenizing (patched)")
        return [self.patch_ids(ids) for ids in base]

    def __call__(self, text, padding: Union[bool, str] = False, truncation: bool = False,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True, **_ignored):
        """HF-style call: a str or a list of str -> BatchEncoding with input_ids and attention_mask."""
        from transformers import BatchEncoding

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        if padding in (True, "longest", "max_length"):
            target = max_length if padding == "max_length" and max_length else max((len(x) for x in ids), default=0)
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            left = self.padding_side == "left"
            masks = [([0] * (target - len(x)) + [1] * len(x)) if left else ([1] * len(x) + [0] * (target - len(x)))
                     for x in ids]
            ids = [([pad] * (target - len(x)) + x) if left else (x + [pad] * (target - len(x))) for x in ids]
        else:
            masks = [[1] * len(x) for x in ids]
        data = {"input_ids": ids[0] if single and return_tensors is None else ids}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return BatchEncoding(data, tensor_type=return_tensors)

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False,
                            return_tensors: Optional[str] = None, **kwargs):
        """Render with the base chat template, then (if tokenize) encode with the patched vocabulary.

        The template's markers are special tokens and n-grams never contain special tokens,
        so no n-token crosses a message boundary.
        """
        text = self.base.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
        if not tokenize:
            return text
        if isinstance(text, list):
            ids = [self.encode(t, add_special_tokens=False) for t in text]
        else:
            ids = self.encode(text, add_special_tokens=False)
        if return_tensors == "pt":
            import torch
            return torch.tensor([ids] if ids and isinstance(ids[0], int) else ids)
        return ids

    # ---- decoding ---------------------------------------------------------------------------
    def expand_ids(self, ids: Iterable[int]) -> List[int]:
        """Base token ids for patched ids (n-tokens expanded)."""
        out: List[int] = []
        ngrams = self.ngrams
        for t in _as_int_list(ids):
            parts = ngrams.get(t)
            if parts is None:
                out.append(t)
            else:
                out.extend(parts)
        return out

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of patched ids; a window ending inside a UTF-8 character ends with U+FFFD."""
        return self.base.decode(self.expand_ids(ids), skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> List[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Token strings; an n-token's string is the concatenation of its base token strings."""
        single = isinstance(ids, (int, np.integer))
        out = []
        for t in _as_int_list([ids] if single else ids):
            if skip_special_tokens and t in self._special_ids:
                continue
            parts = self.ngrams.get(t)
            if parts is None:
                out.append(self._backend.id_to_token(t))
            else:
                out.append("".join(self._backend.id_to_token(p) for p in parts))
        return out[0] if single else out

    def convert_tokens_to_ids(self, tokens):
        single = isinstance(tokens, str)
        vocab = self.get_vocab()
        out = [vocab.get(t, self.unk_token_id) for t in ([tokens] if single else tokens)]
        return out[0] if single else out

    def get_vocab(self) -> Dict[str, int]:
        """Token string -> id for the patched vocabulary (removed base tokens are absent)."""
        vocab = {tok: i for tok, i in self._backend.get_vocab(with_added_tokens=True).items() if i not in self.ngrams}
        for i in self.ngrams:
            vocab.setdefault(self.convert_ids_to_tokens(i), i)
        return vocab

    def is_ngram(self, token_id: int) -> bool:
        return int(token_id) in self.ngrams

    # ---- HF attributes ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def __len__(self) -> int:
        return len(self.base)

    @property
    def chat_template(self):
        return self.base.chat_template

    @property
    def all_special_ids(self) -> List[int]:
        return self.base.all_special_ids

    @property
    def all_special_tokens(self) -> List[str]:
        return self.base.all_special_tokens

    @property
    def special_tokens_map(self):
        return self.base.special_tokens_map

    def __getattr__(self, name):
        # bos/eos/pad/unk token strings and ids, model_max_length: the base's values.
        if name.endswith("_token_id") or name.endswith("_token") or name == "model_max_length":
            return getattr(self.base, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"PatchTokenizer(vocab_size={self.vocab_size}, ngrams={len(self.ngrams)}, max_ngram={self._max_n})"

    # ---- internals --------------------------------------------------------------------------
    @property
    def _merge_of(self) -> Dict[int, Tuple[int, int]]:
        """id -> the two ids of the lowest-ranked BPE merge that produces it."""
        cached = self.__dict__.get("_merge_of_cache")
        if cached is not None:
            return cached
        model = json.loads(self._base_json)["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"only BPE base tokenizers are supported, this one is {model.get('type')!r}")
        vocab = model["vocab"]
        merge_of: Dict[int, Tuple[int, int]] = {}
        for m in model["merges"]:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            target = vocab.get(a + b)
            if target is not None and target not in merge_of and a in vocab and b in vocab:
                merge_of[target] = (vocab[a], vocab[b])
        self.__dict__["_merge_of_cache"] = merge_of
        return merge_of

    def _removed_pieces(self, removed: set) -> Dict[int, Tuple[int, ...]]:
        """For each removed id, the surviving base ids whose strings concatenate to it."""
        if not removed:
            return {}
        merge_of = self._merge_of

        def pieces(t: int) -> List[int]:
            if t not in removed:
                return [t]
            if t not in merge_of:
                raise ValueError(f"base token {t} cannot be removed: no BPE merge produces it")
            a, b = merge_of[t]
            return pieces(a) + pieces(b)

        return {t: tuple(pieces(t)) for t in removed}

    def _validate_ngrams(self) -> None:
        vocab_len = self._backend.get_vocab_size(with_added_tokens=True)
        for new_id, parts in self.ngrams.items():
            if not 0 <= new_id < vocab_len:
                raise ValueError(f"n-token id {new_id} is outside the base vocabulary (size {vocab_len})")
            if new_id in self._special_ids:
                raise ValueError(f"n-token id {new_id} would replace a special token")
            if len(parts) < 2:
                raise ValueError(f"n-token {new_id} has {len(parts)} components; an n-gram needs at least 2")
            for p in parts:
                if p in self.ngrams or p in self._special_ids or not 0 <= p < vocab_len:
                    raise ValueError(f"n-token {new_id} has invalid component {p} (removed, special or out of range)")
        if len({tuple(v) for v in self.ngrams.values()}) != len(self.ngrams):
            raise ValueError("the n-gram table holds the same n-gram twice")


def read_json_file(path: Union[str, Path], what: str):
    """Parsed JSON of `path`; unreadable, non-UTF-8 or malformed files raise ValueError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_saved(obj, file: Path) -> None:
    """Raise ValueError unless `obj` has the shape `save_pretrained` writes.

    Only types and structure; id ranges and n-gram rules are checked by the constructor.
    """
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{str(file)!r} is not a valid patch tokenizer file: {what}")

    need(isinstance(obj, dict), f"expected a JSON object, got {type(obj).__name__}")
    need(obj.get("format") == FORMAT and obj.get("version") == VERSION,
         f'"format" and "version" must be {FORMAT!r} and {VERSION}')
    need(isinstance(obj.get("base_fingerprint"), str), '"base_fingerprint" must be a string')
    cfg = obj.get("base_config")
    need(isinstance(cfg, dict) and all(v is None or isinstance(v, str) for v in cfg.values()),
         '"base_config" must be an object of strings')
    base = obj.get("base_tokenizer")
    need(isinstance(base, dict) and isinstance(base.get("model"), dict),
         '"base_tokenizer" must be a tokenizer.json object')
    ngrams = obj.get("ngrams")
    need(isinstance(ngrams, list), '"ngrams" must be a list')
    for i, e in enumerate(ngrams):
        need(isinstance(e, dict) and _is_int(e.get("id")) and isinstance(e.get("tokens"), list)
             and all(_is_int(t) for t in e["tokens"]), f'"ngrams"[{i}] must be {{"id": int, "tokens": [int, ...]}}')
    ids = [e["id"] for e in ngrams]
    need(len(set(ids)) == len(ids), '"ngrams" gives the same id twice')
    need(obj.get("removed_ids", sorted(ids)) == sorted(ids), '"removed_ids" does not match the n-gram ids')
    need(isinstance(obj.get("build", {}), dict), '"build" must be an object')


def check_same_base(fingerprint: str, tokenizer_json_path: Path, what: str) -> None:
    """Raise when the tokenizer.json at `tokenizer_json_path` is not the base of `what`."""
    obj = read_json_file(tokenizer_json_path, "tokenizer file")
    if not isinstance(obj, dict):
        raise ValueError(f"tokenizer file {str(tokenizer_json_path)!r} is not a tokenizer.json object")
    other = tokenizer_fingerprint(obj)
    if other != fingerprint:
        raise ValueError(
            f"{what} was built for a different base tokenizer than {str(tokenizer_json_path)!r} "
            f"(fingerprint {fingerprint[:12]} vs {other[:12]}); rebuild it for this model")


def _base_config(hf) -> dict:
    cfg = {name: getattr(hf, name, None) for name in _SPECIAL_NAMES}
    cfg = {k: (str(v) if v is not None else None) for k, v in cfg.items()}
    cfg["chat_template"] = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
    return cfg


def _as_hf_tokenizer(base):
    if isinstance(base, (str, Path)):
        from adaptivocab.base_model import load_hf_tokenizer
        base = load_hf_tokenizer(base)
    if not hasattr(base, "backend_tokenizer"):
        raise ValueError(f"base tokenizer must be a fast (tokenizers-backed) HF tokenizer, got {type(base).__name__}")
    return base


def _as_int_list(ids) -> List[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(t) for t in ids]
