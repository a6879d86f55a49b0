"""Teacher targets: the base model's next-token distribution, re-expressed in patched tokens.

The base model is a perfect teacher for the patched one. After a context, the patched
encoding's next token is the longest n-gram of the table that the continuation starts
with (the patch tokenizer merges longest match first, left to right), else the next base
token. So with P(s) = the base's probability that the continuation starts with the base
tokens of s (a product of its conditionals):

    P_patched(s) = P(s) - sum of P(c) over the children c of s,

where the children of s are the table n-grams whose longest proper prefix in the table
(or, failing that, whose first token) is s. Children of one s are never prefixes of each
other, so their events are disjoint and the subtraction is exact; the targets sum to 1.

P(c) needs the base's conditional after every proper prefix of c. Along the text itself
these come free from one forward pass over the block. Off the text, prefixes are
evaluated best first by probability mass, in rounds (a round's prefixes extend the last
round's), each round one forward pass of new tokens over the block's KV cache with a
tree attention mask. Prefixes left unevaluated (mass below `min_mass`, or beyond the
budget) leave the split of their mass unknown: that mass (recorded per position as
`uncovered`) and the probabilities of the tokens it could go to (the prefix's holder, the
shorter token the text would end on, and every n-token below the prefix) go unlisted, into
the `rest` outcome, so the targets are exact, only coarser there. Removed base tokens
(their ids now name n-tokens) get no mass: each conditional is renormalised without them.

Targets are stored sparse: the `top_k` most likely patched tokens of each position, with
the rest of the mass as one number (the loss uses it as one more outcome). A cache
directory holds one safetensors file per training block plus a JSON header that pins
the base model, the patch tokenizer, the corpus blocks and these settings. No pickle.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adaptivocab.patch_tokenizer import PatchTokenizer

CACHE_HEADER = "teacher_targets.json"


@dataclass
class TeacherConfig:
    top_k: int = 32                    # stored patched tokens per position
    expand_per_position: float = 4.0   # off-text prefixes evaluated per position, on average over a block
    min_mass: float = 1e-3             # prefixes with less probability are not evaluated
    bf16: bool = False                 # teacher forward passes under bf16 autocast

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (self.expand_per_position >= 0 and 0 <= self.min_mass <= 1):
            raise ValueError(f"expand_per_position must be >= 0 and min_mass in [0, 1], got "
                             f"{self.expand_per_position}, {self.min_mass}")


class NgramTrie:
    """Every prefix of every table n-gram, as trie nodes (node 0 is the empty prefix)."""

    def __init__(self, ngrams: Dict[int, Sequence[int]]):
        nodes: Dict[Tuple[int, ...], int] = {(): 0}
        for parts in ngrams.values():
            for k in range(1, len(parts) + 1):
                nodes.setdefault(tuple(parts[:k]), len(nodes))
        n = len(nodes)
        self.node = nodes
        self.parent = np.zeros(n, dtype=np.int64)
        self.token = np.full(n, -1, dtype=np.int64)
        self.depth = np.zeros(n, dtype=np.int64)
        self.ngram_id = np.full(n, -1, dtype=np.int64)   # the n-token id when the node is a table n-gram
        self.fallback = np.full(n, -1, dtype=np.int64)   # where its mass comes from: its longest shorter match
        kids: List[List[int]] = [[] for _ in range(n)]
        table = {tuple(v): int(k) for k, v in ngrams.items()}
        for path, u in nodes.items():
            if not path:
                continue
            self.parent[u] = nodes[path[:-1]]
            self.token[u] = path[-1]
            self.depth[u] = len(path)
            kids[self.parent[u]].append(u)
            if path in table:
                self.ngram_id[u] = table[path]
                shorter = next((table[path[:k]] for k in range(len(path) - 1, 1, -1) if path[:k] in table), path[0])
                self.fallback[u] = shorter
        self.children = [np.array(sorted(c), dtype=np.int64) for c in kids]
        self.child_tokens = [self.token[c] for c in self.children]
        self.child_index = np.zeros(n, dtype=np.int64)   # a node's position among its parent's children
        for c in self.children:
            self.child_index[c] = np.arange(len(c))
        self.has_children = np.array([len(c) > 0 for c in self.children])
        self.max_depth = int(self.depth.max()) if n > 1 else 0
        # holder: the patched token that ends the match when the text stops after the node's prefix
        # (the node's own n-token, else the longest table prefix, else the first token).
        self.holder = np.full(n, -1, dtype=np.int64)
        below: List[List[int]] = [[] for _ in range(n)]
        for path, u in sorted(nodes.items(), key=lambda kv: len(kv[0])):
            if path:
                self.holder[u] = table.get(path, path[0] if len(path) == 1 else self.holder[self.parent[u]])
            if path in table:
                for k in range(1, len(path)):
                    below[nodes[path[:k]]].append(table[path])
        self.descendants = [np.array(b, dtype=np.int64) for b in below]   # n-token ids strictly below


def _prefix_masses(trie: NgramTrie, root_probs: np.ndarray, cond: Dict[int, np.ndarray]):
    """(P(prefix) of each evaluated node, and its children's conditional probabilities), root included."""
    mass = {0: 1.0}
    child_p = {0: root_probs[trie.child_tokens[0]].astype(np.float64)}
    for u in sorted(cond, key=lambda v: trie.depth[v]):
        parent = int(trie.parent[u])
        if parent not in mass:
            raise ValueError(f"prefix node {u} was evaluated but its parent {parent} was not")
        mass[u] = mass[parent] * child_p[parent][trie.child_index[u]]
        child_p[u] = cond[u]
    return mass, child_p


def patched_distribution(trie: NgramTrie, root_probs: np.ndarray,
                         cond: Dict[int, np.ndarray]) -> Tuple[np.ndarray, float, np.ndarray]:
    """(target over patched ids, uncovered mass, unsure ids) at one position.

    `root_probs` is the base's next-token distribution (removed ids already zero);
    `cond[u]` gives, for an evaluated prefix node u, the base's probabilities of u's trie
    children's last tokens after the context followed by u. The mass of a prefix that was
    not evaluated is left on its holder; the holder and every n-token below the prefix are
    the unsure ids: their own probabilities are unknown, only their sum is exact.
    """
    target = root_probs.astype(np.float64, copy=True)
    mass, child_p = _prefix_masses(trie, root_probs, cond)
    uncovered = 0.0
    unsure: List[np.ndarray] = []
    evaluated = np.fromiter(cond, dtype=np.int64, count=len(cond))
    for u, m in mass.items():
        kids = trie.children[u]
        cm = m * child_p[u]
        is_ngram = trie.ngram_id[kids] >= 0
        np.add.at(target, trie.ngram_id[kids[is_ngram]], cm[is_ngram])
        np.subtract.at(target, trie.fallback[kids[is_ngram]], cm[is_ngram])
        open_ = trie.has_children[kids] & ~np.isin(kids, evaluated) & (cm > 0)
        uncovered += float(cm[open_].sum())
        for v in kids[open_]:
            unsure.append(trie.descendants[v])
            unsure.append(trie.holder[v:v + 1])
    np.maximum(target, 0.0, out=target)   # rounding only: children never outweigh their parent
    ids = np.unique(np.concatenate(unsure)) if unsure else np.zeros(0, dtype=np.int64)
    return target / target.sum(), uncovered, ids


def _tree_mask(rows: List[Tuple[int, Tuple[int, ...]]], past: int, n_new: int) -> torch.Tensor:
    """Boolean (1, 1, n_new, past + n_new) mask: row r sees base tokens [0, base_len) and its slots."""
    mask = torch.zeros(1, 1, n_new, past + n_new, dtype=torch.bool)
    for r, (base_len, slots) in enumerate(rows):
        mask[0, 0, r, :base_len] = True
        if slots:
            mask[0, 0, r, list(slots)] = True
        mask[0, 0, r, past + r] = True
    return mask


@torch.inference_mode()
def block_targets(model, tok: PatchTokenizer, trie: NgramTrie, block: Sequence[int], cfg: TeacherConfig) -> Dict[str, torch.Tensor]:
    """Sparse teacher targets for a block of patched ids.

    Row r is the target for patched token r + 1 given tokens 0..r (the rows a causal LM's
    logits give for `block`). Returns idx [L-1, top_k] int32, prob [L-1, top_k] float32,
    rest [L-1] (the mass outside idx), uncovered [L-1] and the counts of prefixes evaluated.
    """
    block = [int(t) for t in block]
    if len(block) < 2:
        raise ValueError("a block needs at least 2 tokens")
    base: List[int] = []
    starts: List[int] = []
    for t in block:
        starts.append(len(base))
        base.extend(tok.ngrams.get(t, (t,)))
    removed = torch.tensor(sorted(tok.ngrams), dtype=torch.long)

    def logprobs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[:, removed] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        out = model(input_ids=torch.tensor([base]), use_cache=True)
    base_lp = logprobs(out.logits[0])
    cache = out.cache
    n_base = len(base)

    def probs_of(lp_row: torch.Tensor, u: int) -> np.ndarray:
        return lp_row[torch.from_numpy(trie.child_tokens[u])].double().exp().numpy()

    positions = range(1, len(block))
    cond: Dict[int, Dict[int, np.ndarray]] = {j: {} for j in positions}
    where: Dict[int, Dict[int, Tuple[int, Tuple[int, ...]]]] = {j: {0: (starts[j], ())} for j in positions}
    for j in positions:   # prefixes along the text: their conditionals are rows of the block's pass
        i = starts[j]
        for k in range(1, trie.max_depth):
            if i + k > n_base or (u := trie.node.get(tuple(base[i:i + k]))) is None or not trie.has_children[u]:
                break
            cond[j][u] = probs_of(base_lp[i + k - 1], u)
            where[j][u] = (i + k, ())
    root = {j: base_lp[starts[j] - 1].double().exp().numpy() for j in positions}

    budget = int(cfg.expand_per_position * len(positions))
    expanded = 0
    past = n_base
    for _ in range(max(0, trie.max_depth - 1)):
        if expanded >= budget:
            break
        cands = []   # (mass, position, node)
        for j in positions:
            mass, child_p = _prefix_masses(trie, root[j], cond[j])
            for u, m in mass.items():
                kids = trie.children[u]
                cm = m * child_p[u]
                pick = np.nonzero(trie.has_children[kids] & (cm >= max(cfg.min_mass, 1e-300)))[0]
                cands.extend((float(cm[p]), j, int(kids[p])) for p in pick if int(kids[p]) not in cond[j])
        cands.sort(reverse=True)
        cands = cands[: budget - expanded]
        if not cands:
            break
        tokens, pos, rows = [], [], []
        for r, (_, j, u) in enumerate(cands):
            base_len, slots = where[j][int(trie.parent[u])]
            tokens.append(int(trie.token[u]))
            pos.append(starts[j] + int(trie.depth[u]) - 1)
            rows.append((base_len, slots))
            where[j][u] = (base_len, slots + (past + r,))
        mask = _tree_mask(rows, past, len(cands))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            new = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([pos]), attention_mask=mask,
                        cache=cache, use_cache=True)
        cache = new.cache
        lp = logprobs(new.logits[0])
        for r, (_, j, u) in enumerate(cands):
            cond[j][u] = probs_of(lp[r], u)
        past += len(cands)
        expanded += len(cands)

    k = min(cfg.top_k, len(tok))
    idx = torch.zeros(len(block) - 1, k, dtype=torch.int32)
    prob = torch.zeros(len(block) - 1, k, dtype=torch.float32)
    rest = torch.zeros(len(block) - 1, dtype=torch.float32)
    uncovered = torch.zeros(len(block) - 1, dtype=torch.float32)
    for j in positions:
        target, unc, unsure = patched_distribution(trie, root[j], cond[j])
        # Unsure ids are never listed: their mass goes to `rest` with everything unlisted, so the
        # targets stay exact (coarser) instead of leaning toward the shorter tokens.
        listed = torch.from_numpy(target).clone()
        listed[torch.from_numpy(unsure)] = -1.0
        top = torch.topk(listed, k)
        values = top.values.clamp_min(0.0)
        idx[j - 1] = top.indices.to(torch.int32)
        prob[j - 1] = values.float()
        rest[j - 1] = float(max(0.0, 1.0 - values.sum().item()))
        uncovered[j - 1] = unc
    return {"idx": idx, "prob": prob, "rest": rest, "uncovered": uncovered,
            "evaluated": torch.tensor([sum(len(c) for c in cond.values()), expanded], dtype=torch.int64)}


def blocks_fingerprint(blocks: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(blocks, dtype=np.int64).tobytes()).hexdigest()


class TargetCache:
    """A directory of per-block teacher targets, pinned to what produced them."""

    def __init__(self, directory: Union[str, Path], header: dict):
        self.dir = Path(directory)
        self.header = header
        path = self.dir / CACHE_HEADER
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {str(path)!r}: {e}") from None
            if saved != header:
                diff = sorted(k for k in set(saved) | set(header) if saved.get(k) != header.get(k))
                raise ValueError(f"teacher targets in {str(self.dir)!r} were made with other settings ({', '.join(diff)}); "
                                 f"use another directory or delete it")
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(f"{str(self.dir)!r} exists, is not empty and holds no {CACHE_HEADER}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header, indent=1), encoding="utf-8")

    def _file(self, block: int) -> Path:
        return self.dir / f"block-{block:07d}.safetensors"

    def has(self, block: int) -> bool:
        return self._file(block).is_file()

    def blocks(self) -> List[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("block-*.safetensors"))

    def load(self, block: int) -> Dict[str, torch.Tensor]:
        try:
            return load_file(str(self._file(block)))
        except Exception as e:  # safetensors raises its own error class
            raise ValueError(f"cannot read teacher targets {str(self._file(block))!r}: {e}") from None

    def save(self, block: int, targets: Dict[str, torch.Tensor]) -> None:
        tmp = self._file(block).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in targets.items()}, str(tmp))
        tmp.replace(self._file(block))


def cache_header(base_dir: Path, tok: PatchTokenizer, blocks: np.ndarray, cfg: TeacherConfig) -> dict:
    ngrams = json.dumps(sorted((k, list(v)) for k, v in tok.ngrams.items()))
    weights = sorted(base_dir.glob("*.safetensors"))
    return {"format": "adaptivocab.teacher_targets", "version": 2, "base_model": str(base_dir),
            "base_weights": [[p.name, p.stat().st_size] for p in weights],
            "tokenizer": tok.fingerprint, "ngrams": hashlib.sha256(ngrams.encode()).hexdigest(),
            "blocks": blocks_fingerprint(blocks), "seq_len": int(blocks.shape[1]),
            "config": {k: v for k, v in asdict(cfg).items() if k != "bf16"}, "bf16": cfg.bf16}


def compute_targets(base_model, tok: PatchTokenizer, blocks: np.ndarray, order: Sequence[int], cache: TargetCache,
                    cfg: TeacherConfig, max_blocks: int, max_minutes: float) -> dict:
    """Fill `cache` for the first `max_blocks` blocks of `order` (skipping cached ones) within `max_minutes`."""
    trie = NgramTrie(tok.ngrams)
    todo = [int(b) for b in order[:max_blocks] if not cache.has(int(b))]
    start = time.perf_counter()
    stats = {"computed": 0, "tokens": 0, "uncovered_sum": 0.0, "rest_sum": 0.0, "evaluated": 0, "expanded": 0}
    bar = tqdm(todo, desc="teacher targets", unit="block")
    for b in bar:
        if (time.perf_counter() - start) / 60 >= max_minutes:
            break
        t = block_targets(base_model, tok, trie, blocks[b], cfg)
        cache.save(b, t)
        stats["computed"] += 1
        stats["tokens"] += len(t["rest"])
        stats["uncovered_sum"] += float(t["uncovered"].sum())
        stats["rest_sum"] += float(t["rest"].sum())
        stats["evaluated"] += int(t["evaluated"][0])
        stats["expanded"] += int(t["evaluated"][1])
        bar.set_postfix(uncovered=f"{stats['uncovered_sum'] / stats['tokens']:.4f}")
    bar.close()
    stats["minutes"] = (time.perf_counter() - start) / 60
    stats["cached_blocks"] = len(cache.blocks())
    if stats["tokens"]:
        stats["mean_uncovered"] = stats["uncovered_sum"] / stats["tokens"]
        stats["mean_rest"] = stats["rest_sum"] / stats["tokens"]
    return stats


def teacher_loss(logits: torch.Tensor, idx: torch.Tensor, prob: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's distribution to the sparse targets (rest as one outcome).

    logits [..., V]; idx / prob [..., K]; rest [...]. Equals KL(target || model) plus the
    target's entropy over the K + 1 outcomes, so its gradient is the KL's.
    """
    logq = torch.log_softmax(logits.float(), dim=-1)
    lq_top = logq.gather(-1, idx.long())
    q_rest = (1.0 - lq_top.exp().sum(-1)).clamp_min(1e-12)
    return -((prob * lq_top).sum(-1) + rest * q_rest.log()).mean()


def open_targets(directory: Union[str, Path], tok: PatchTokenizer, blocks: np.ndarray) -> TargetCache:
    """An existing target cache, checked against the fine-tune's tokenizer and corpus blocks."""
    path = Path(directory) / CACHE_HEADER
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} holds no teacher targets ({CACHE_HEADER} is missing); "
                         f"make them with `python -m adaptivocab teacher-targets`")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None
    ngrams = json.dumps(sorted((k, list(v)) for k, v in tok.ngrams.items()))
    want = {"tokenizer": tok.fingerprint, "ngrams": hashlib.sha256(ngrams.encode()).hexdigest(),
            "blocks": blocks_fingerprint(blocks), "seq_len": int(blocks.shape[1])}
    diff = [k for k, v in want.items() if header.get(k) != v]
    if diff:
        raise ValueError(f"teacher targets in {str(directory)!r} belong to another {', '.join(diff)} "
                         f"(same model, corpus and --seq-len needed)")
    cache = TargetCache(directory, header)
    if not cache.blocks():
        raise ValueError(f"{str(directory)!r} holds no block of teacher targets yet")
    return cache


def make_targets(model_dir: Union[str, Path], corpus: Sequence[Union[str, Path]], out: Union[str, Path],
                 cfg: TeacherConfig, seq_len: int = 256, seed: int = 0, max_blocks: int = 1000,
                 max_minutes: float = 30.0, base: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Compute (or extend) the teacher targets of a patched model's fine-tuning blocks.

    The blocks are those `finetune` cuts from `corpus` with the same `seq_len`, taken in
    the order its `seed` visits them, so a fine-tune over the cached blocks sees exactly
    these. The teacher is the patched model's base (or `base`).
    """
    from transformers import AutoModelForCausalLM

    from adaptivocab.base_model import resolve_model_dir
    from adaptivocab.corpus import corpus_blocks, read_corpus
    from adaptivocab.patch_tokenizer import check_same_base, is_patch_tokenizer_dir, read_json_file

    model_dir = Path(model_dir)
    if not is_patch_tokenizer_dir(model_dir):
        raise ValueError(f"{str(model_dir)!r} is not a patched model directory (run patch-model first)")
    if base is None:
        base = read_json_file(model_dir / "config.json", "model config").get("adaptivocab", {}).get("base_model")
        if base is None:
            raise ValueError(f"{str(model_dir)!r} does not name its base model; pass --base")
    base_dir = resolve_model_dir(base)
    tok = PatchTokenizer.from_pretrained(model_dir)
    check_same_base(tok.fingerprint, base_dir / "tokenizer.json", what="the patched model")
    if threads:
        torch.set_num_threads(threads)
    blocks = corpus_blocks(tok, read_corpus(corpus), seq_len)
    cache = TargetCache(out, cache_header(base_dir, tok, blocks, cfg))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    order = np.random.default_rng(seed).permutation(len(blocks))
    stats = compute_targets(model, tok, blocks, order, cache, cfg, max_blocks, max_minutes)
    log = cache.dir / "teacher_log.json"
    runs = json.loads(log.read_text(encoding="utf-8")) if log.is_file() else []
    log.write_text(json.dumps(runs + [{**stats, "seed": seed, "max_blocks": max_blocks}], indent=1), encoding="utf-8")
    return stats
