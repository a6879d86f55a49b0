"""Giving a model rows for its new n-tokens: embedding initialisation and the patched directory.

Each n-token id was a removed base token, so its rows in the input embedding and in the
LM head are overwritten by a weighted average of its components' rows:

- exp:   input row weights e^i / sum (i = 0..n-1, leaning on the last component, since the
         model continues from where the n-gram ends), output row weights reversed
         (leaning on the first component: predicting the n-token starts with predicting
         its first piece);
- mean:  plain average for both;
- first: both rows copied from the first component;
- last:  both rows copied from the last component.

When the base ties its embeddings and the new input and output rows differ (exp), the
patched model gets its own lm_head and `tie_word_embeddings: false`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from adaptivocab.base_model import resolve_model_dir
from adaptivocab.outdir import LEGACY_MARKER, MARKER, check_output_dir, staged_output_dir
from adaptivocab.patch_tokenizer import PATCH_TOKENIZER_FILE, PatchTokenizer, check_same_base, read_json_file

INIT_METHODS = ("exp", "mean", "first", "last")
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def component_weights(n: int, method: str) -> Tuple[List[float], List[float]]:
    """(input weights, output weights) over the n components of an n-token."""
    if method == "exp":
        w = [math.exp(i) for i in range(n)]
        s = sum(w)
        inp = [x / s for x in w]
        return inp, inp[::-1]
    if method == "mean":
        return [1.0 / n] * n, [1.0 / n] * n
    if method == "first":
        one = [1.0] + [0.0] * (n - 1)
        return one, one
    if method == "last":
        one = [0.0] * (n - 1) + [1.0]
        return one, one
    raise ValueError(f"unknown init method {method!r}; choose one of {', '.join(INIT_METHODS)}")


def init_ngram_rows(embed: torch.Tensor, lm_head: torch.Tensor, ngrams: Dict[int, Sequence[int]],
                    method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """New (embed, lm_head) with each n-token row set from the base rows of its components."""
    new_embed, new_head = embed.clone(), lm_head.clone()
    for new_id, parts in ngrams.items():
        w_in, w_out = component_weights(len(parts), method)
        idx = torch.tensor(parts, dtype=torch.long)
        # Components are never removed ids, so reading the base rows is safe in any order.
        new_embed[new_id] = (torch.tensor(w_in, dtype=torch.float64)[:, None] * embed[idx].double()).sum(0).to(embed.dtype)
        new_head[new_id] = (torch.tensor(w_out, dtype=torch.float64)[:, None] * lm_head[idx].double()).sum(0).to(lm_head.dtype)
    return new_embed, new_head


def load_state_dict(model_dir: Path) -> Dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(model_dir)!r} has no .safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error class for corrupt files
            raise ValueError(f"cannot read weights {str(f)!r}: {e}") from None
    return state


def write_model_files(directory: Path, source_dir: Path, config: dict, state: Dict[str, torch.Tensor],
                      tokenizer: PatchTokenizer) -> None:
    """Write an HF-style model (config, safetensors, tokenizer files, patch tokenizer) into `directory`."""
    for f in source_dir.iterdir():
        # Tokenizer files and generation config travel with the model; weights are rewritten.
        if f.is_file() and f.name not in _WEIGHT_FILES and f.suffix != ".safetensors" \
                and f.name not in ("config.json", PATCH_TOKENIZER_FILE, MARKER, LEGACY_MARKER):
            shutil.copy2(f, directory / f.name)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(directory)


def patch_model(model: Union[str, Path], patch_tokenizer: Union[str, Path, PatchTokenizer], out: Union[str, Path],
                init: str = "exp", overwrite: bool = False) -> Path:
    """Write a patched copy of `model` whose n-token rows are initialised by `init`.

    `out` is written into a temporary sibling and renamed into place; an existing `out`
    is an error unless `overwrite` and it is an earlier adaptivocab output.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"unknown init method {init!r}; choose one of {', '.join(INIT_METHODS)}")
    inputs = [] if isinstance(patch_tokenizer, PatchTokenizer) else [patch_tokenizer]
    check_output_dir(out, overwrite, inputs + [model])  # before resolving: that may convert a GGUF file
    model_dir = resolve_model_dir(model)
    inputs.append(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
    tok = patch_tokenizer if isinstance(patch_tokenizer, PatchTokenizer) else PatchTokenizer.from_pretrained(patch_tokenizer)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no tokenizer.json to check the patch tokenizer against")
    check_same_base(tok.fingerprint, model_dir / "tokenizer.json", what="the patch tokenizer")
    config = read_json_file(model_dir / "config.json", "model config")
    state = load_state_dict(model_dir)
    if EMBED_KEY not in state:
        raise ValueError(f"model in {str(model_dir)!r} has no {EMBED_KEY} (only Llama-style models are supported)")
    embed = state[EMBED_KEY]
    lm_head = state.get(LM_HEAD_KEY, embed)
    if embed.shape[0] < len(tok):
        raise ValueError(f"model has {embed.shape[0]} embedding rows but the tokenizer has {len(tok)} ids")
    new_embed, new_head = init_ngram_rows(embed, lm_head, tok.ngrams, init)
    state[EMBED_KEY] = new_embed
    state[LM_HEAD_KEY] = new_head
    config["tie_word_embeddings"] = bool(torch.equal(new_embed, new_head))
    config["adaptivocab"] = {"init": init, "num_ngrams": len(tok.ngrams), "base_model": str(model_dir)}
    with staged_output_dir(out, "patch-model", overwrite, inputs) as tmp:
        write_model_files(tmp, model_dir, config, state, tok)
    return Path(out)
