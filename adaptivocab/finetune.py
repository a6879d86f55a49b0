"""Light fine-tuning of a patched model on CPU: embeddings, LM head, first and last layers.

With teacher targets (adaptivocab.teacher), half of each batch comes from the blocks whose
targets were computed, and the loss is (1 - w) * next-token cross-entropy over the batch
plus w * cross-entropy to the base model's full next-token distribution on those blocks.

The corpus is encoded with the patched tokenizer and cut into blocks of `seq_len` tokens,
visited in a seeded random order. Only the chosen parts train (the rest is frozen, but
gradients still flow through it down to the first layer and the embeddings). Training
stops at a token budget or a wall-clock budget, whichever comes first.

Resumable: every `save_every` steps the trainable tensors and the AdamW moments go to
`<out>.checkpoint/` as safetensors, with a JSON state (step, tokens seen, minutes, the
bits/byte curve). Running the same command again continues from there. No pickle.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adaptivocab.corpus import corpus_blocks, read_corpus
from adaptivocab.metrics import bits_per_byte, heldout_sample
from adaptivocab.outdir import check_output_dir, is_our_output, staged_output_dir, write_marker
from adaptivocab.patch_model import write_model_files
from adaptivocab.patch_tokenizer import PatchTokenizer, is_patch_tokenizer_dir
from adaptivocab.teacher import open_targets, teacher_loss

TRAINABLE_PARTS = ("embeddings", "lm_head", "first_layer", "last_layer", "norm", "all")


@dataclass
class FinetuneConfig:
    train: List[str] = field(default_factory=lambda: ["embeddings", "lm_head", "first_layer", "last_layer"])
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    max_tokens: int = 1_000_000
    max_minutes: float = 25.0
    eval_every: int = 50
    eval_bytes: int = 20_000
    save_every: int = 50
    seed: int = 0
    bf16: bool = False
    threads: Optional[int] = None
    teacher_targets: Optional[str] = None   # a teacher-targets directory: train on its blocks, with its targets
    teacher_weight: float = 0.5             # loss = (1 - w) * one-hot CE + w * CE to the teacher's targets

    def __post_init__(self):
        check_train_parts(self.train)
        for name in ("seq_len", "batch_size", "max_tokens", "eval_every", "eval_bytes", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.max_minutes > 0 and self.warmup_steps >= 0):
            raise ValueError(f"lr and max_minutes must be > 0 and warmup_steps >= 0, got {self.lr}, "
                             f"{self.max_minutes}, {self.warmup_steps}")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def check_train_parts(parts: Sequence[str]) -> None:
    """Raise ValueError unless `parts` is a non-empty list of TRAINABLE_PARTS names."""
    unknown = [p for p in parts if p not in TRAINABLE_PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown or empty --train parts {unknown or list(parts)}; "
                         f"choose from {', '.join(TRAINABLE_PARTS)}")


def select_trainable(model, parts: Sequence[str]) -> List[str]:
    """Freeze everything but `parts`; return the names of the trainable parameters."""
    check_train_parts(parts)
    layers = model.model.layers
    prefixes = []
    if "all" in parts:
        prefixes.append("")
    if "embeddings" in parts:
        prefixes.append("model.embed_tokens.")
    if "lm_head" in parts:
        prefixes.append("lm_head.")
    if "first_layer" in parts:
        prefixes.append("model.layers.0.")
    if "last_layer" in parts:
        prefixes.append(f"model.layers.{len(layers) - 1}.")
    if "norm" in parts:
        prefixes.append("model.norm.")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p) for p in prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def _save_checkpoint(ckpt: Path, model, names: List[str], opt: torch.optim.Optimizer, state: dict) -> None:
    # Written aside and swapped in, so an interrupted save keeps the previous checkpoint.
    with staged_output_dir(ckpt, "finetune-checkpoint", overwrite=True) as tmp:
        params = dict(model.named_parameters())
        save_file({n: params[n].detach().contiguous() for n in names}, str(tmp / "trainable.safetensors"))
        moments = {}
        steps = {}
        opt_state = opt.state_dict()["state"]
        for idx, st in opt_state.items():
            moments[f"{idx}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{idx}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            steps[str(idx)] = float(st["step"])
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_steps": steps, "trainable": names}, indent=1))


def _load_checkpoint(ckpt: Path, model, names: List[str], opt: torch.optim.Optimizer) -> dict:
    try:
        state = json.loads((ckpt / "state.json").read_text())
        saved = load_file(str(ckpt / "trainable.safetensors"))
        moments = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as e:  # missing files, bad JSON, safetensors' own error class
        raise ValueError(f"cannot resume from checkpoint {str(ckpt)!r} ({e}); delete it to start afresh") from None
    if state.get("trainable") != names:
        raise ValueError(f"checkpoint {str(ckpt)!r} trained other parameters; use the same --train or delete it")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(saved[n])
    sd = opt.state_dict()
    sd["state"] = {int(i): {"step": torch.tensor(s), "exp_avg": moments[f"{i}.exp_avg"],
                            "exp_avg_sq": moments[f"{i}.exp_avg_sq"]}
                   for i, s in state["optimizer_steps"].items()}
    opt.load_state_dict(sd)
    if not is_our_output(ckpt):
        write_marker(ckpt, "finetune-checkpoint")  # written before markers existed; it loaded, so it is ours
    return state


def finetune(model_dir: Union[str, Path], corpus: Sequence[Union[str, Path]], out: Union[str, Path],
             cfg: FinetuneConfig, eval_corpus: Optional[Sequence[Union[str, Path]]] = None,
             overwrite: bool = False) -> Path:
    """Fine-tune the patched model in `model_dir` on `corpus`; write the result to `out`."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    inputs = [model_dir, *corpus, *(eval_corpus or [])]
    out = check_output_dir(out, overwrite, inputs)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    if not is_patch_tokenizer_dir(model_dir):
        raise ValueError(f"{str(model_dir)!r} is not a patched model directory (run patch-model first)")
    ckpt = out.with_name(out.name + ".checkpoint")
    if ckpt.exists() and not is_our_output(ckpt) and not (ckpt / "state.json").is_file():
        raise ValueError(f"{str(ckpt)!r} (where the checkpoint goes) exists and is not an adaptivocab checkpoint")
    texts = read_corpus(corpus)
    eval_text = heldout_sample(read_corpus(eval_corpus, "eval corpus file"), cfg.eval_bytes) if eval_corpus else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = PatchTokenizer.from_pretrained(model_dir)
    blocks = corpus_blocks(tok, texts, cfg.seq_len)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, tie_word_embeddings=False)
    names = select_trainable(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = max(1, cfg.max_tokens // tokens_per_step)
    order = np.random.default_rng(cfg.seed).permutation(len(blocks))
    teacher, n_teacher = None, 0
    if cfg.teacher_targets:
        # Half of each batch (rounded up) cycles through the blocks that have teacher targets,
        # the rest goes through the corpus as without a teacher.
        teacher = open_targets(cfg.teacher_targets, tok, blocks)
        pool = np.array(teacher.blocks(), dtype=np.int64)
        pool = pool[np.random.default_rng(cfg.seed + 1).permutation(len(pool))]
        n_teacher = (cfg.batch_size + 1) // 2

    state = {"step": 0, "tokens_seen": 0, "minutes": 0.0, "curve": [], "config": asdict(cfg),
             "trainable_params": int(sum(p.numel() for p in params)), "corpus_tokens": int(blocks.size)}
    if ckpt.is_dir():
        saved = _load_checkpoint(ckpt, model, names, opt)
        # Progress comes from the checkpoint; the configuration is this run's (a resume may raise the budget).
        state.update({k: v for k, v in saved.items() if k in state and k != "config"})
        state["resumed_at_steps"] = saved.get("resumed_at_steps", []) + [saved["step"]]
        print(f"resuming from {ckpt} at step {state['step']} ({state['tokens_seen']} tokens seen)")
    elif eval_text is not None:
        state["curve"].append({"step": 0, "tokens": 0, "minutes": 0.0, "bits_per_byte": bits_per_byte(model, tok, eval_text)})

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    model.train()
    start = time.perf_counter() - state["minutes"] * 60
    bar = tqdm(total=total_steps, initial=state["step"], desc="fine-tuning", unit="step")
    step = state["step"]
    while step < total_steps and (time.perf_counter() - start) / 60 < cfg.max_minutes:
        n_corpus = cfg.batch_size - n_teacher
        idx = order[(np.arange(n_corpus) + step * n_corpus) % len(order)]
        if teacher is not None:
            idx = np.concatenate([pool[(np.arange(n_teacher) + step * n_teacher) % len(pool)], idx])
        batch = torch.from_numpy(blocks[idx])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=batch).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss = ce
        if teacher is not None:
            t = [teacher.load(int(b)) for b in idx[:n_teacher]]
            kd = teacher_loss(logits[:n_teacher], *(torch.stack([x[k] for x in t]) for k in ("idx", "prob", "rest")))
            loss = (1 - cfg.teacher_weight) * ce + cfg.teacher_weight * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        state["step"], state["tokens_seen"] = step, state["tokens_seen"] + batch.numel()
        state["minutes"] = (time.perf_counter() - start) / 60
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}", **({"kd": f"{kd.item():.3f}"} if teacher is not None else {}),
                        tok_s=f"{batch.numel() / (time.perf_counter() - t0):.0f}")
        if eval_text is not None and step % cfg.eval_every == 0:
            bpb = bits_per_byte(model, tok, eval_text)
            state["curve"].append({"step": step, "tokens": state["tokens_seen"], "minutes": state["minutes"],
                                   "bits_per_byte": bpb, "loss": loss.item(), "ce": ce.item(),
                                   **({"teacher_ce": kd.item()} if teacher is not None else {})})
            bar.write(f"step {step}: {state['tokens_seen']} tokens, {state['minutes']:.1f} min, held-out bits/byte {bpb:.4f}")
        if step % cfg.save_every == 0:
            _save_checkpoint(ckpt, model, names, opt, state)
    bar.close()
    if eval_text is not None and (not state["curve"] or state["curve"][-1]["step"] != step):
        state["curve"].append({"step": step, "tokens": state["tokens_seen"], "minutes": state["minutes"],
                               "bits_per_byte": bits_per_byte(model, tok, eval_text)})
    _save_checkpoint(ckpt, model, names, opt, state)

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    config.setdefault("adaptivocab", {})["finetune"] = {k: state[k] for k in ("step", "tokens_seen", "minutes")}
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    with staged_output_dir(out, "finetune", overwrite, inputs) as tmp:
        write_model_files(tmp, model_dir, config, weights, tok)
        (tmp / "finetune_log.json").write_text(json.dumps(state, indent=1))
    return out
