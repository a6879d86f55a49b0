"""LoRA / QLoRA fine-tuning with `peft` + `transformers.Trainer`, on CPU or CUDA.

The base is frozen: in float (--base-quantization none), in NF4 through bitsandbytes
(nf4: QLoRA as in the paper; bitsandbytes runs it on CPU too), or as our own 4-bit
groups (int4: the rtn codes of `sarathi quantize`, dequantised per layer inside the
forward). Only the adapter trains; it is written as PEFT writes it (adapter_config.json +
adapter_model.safetensors). Checkpoints under OUT/checkpoint-N make a run resumable.
"""
from __future__ import annotations

import json
import math
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from adaptivocab.outdir import working_output_dir
from sarathi.lora.adapter import LLAMA_LINEARS
from sarathi.lora_training.data import Collator, DataError, encode_examples, encode_rows, read_jsonl

BASE_QUANTIZATIONS = ("none", "nf4", "int4")


@dataclass
class TrainOptions:
    base: str
    data: str
    out: str
    eval_data: Optional[str] = None
    eval_fraction: float = 0.05        # held out from --data when --eval-data is not given
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    base_quantization: str = "none"
    max_length: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    time_budget: Optional[float] = None   # minutes of training, then save and stop
    stop_after_steps: Optional[int] = None  # end this session after N steps (a checkpoint is saved)
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 5
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    threads: Optional[int] = None
    # Recompute each layer's activations in the backward instead of keeping them: the QLoRA
    # recipe (peft's prepare_model_for_kbit_training turns it on). auto: on for a 4-bit base.
    gradient_checkpointing: str = "auto"


class Int4Linear(nn.Linear):
    """A frozen nn.Linear whose weight lives as 4-bit group codes (asymmetric, group 64 or the
    whole row) and is dequantised for each forward; peft wraps it like any nn.Linear."""

    def __init__(self, linear: nn.Linear, group_size: int = 64):
        from sarathi.quantize.algorithms import QuantSpec, rtn_quantize

        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        gs = group_size if self.in_features % group_size == 0 else self.in_features
        res = rtn_quantize(w, QuantSpec(bits=4, group_size=gs, sym=False, v1_zeros=False))
        codes = res.q.to(torch.uint8)
        self.register_buffer("packed", codes[:, 0::2] | (codes[:, 1::2] << 4))   # two codes a byte
        self.register_buffer("scales", res.scales.t().contiguous().half())        # [out, groups]
        self.register_buffer("zeros", res.zeros.t().contiguous().to(torch.uint8))
        self.group_size = gs
        # peft reads weight's dtype / device / shape; the float values are never used.
        self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).flatten(1).float()
        g = codes.view(self.out_features, -1, self.group_size)
        w = (g - self.zeros.float()[:, :, None]) * self.scales.float()[:, :, None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


def _rss_mb() -> float:
    """Resident memory now (the kernel's VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_base(opts: TrainOptions, model_dir: Path):
    """The frozen base model (HF transformers) in the requested format."""
    from transformers import AutoModelForCausalLM

    device = _device(opts.device)
    if opts.base_quantization == "nf4":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, device_map=device,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
        if opts.base_quantization == "int4":
            for name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear) and child_name in LLAMA_LINEARS:
                        setattr(module, child_name, Int4Linear(child))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check(opts: TrainOptions) -> None:
    if opts.base_quantization not in BASE_QUANTIZATIONS:
        raise ValueError(f"--base-quantization must be one of {', '.join(BASE_QUANTIZATIONS)}")
    if opts.gradient_checkpointing not in ("auto", "on", "off"):
        raise ValueError("--gradient-checkpointing must be auto, on or off")
    bad = [m for m in opts.target_modules if m not in LLAMA_LINEARS]
    if bad:
        raise ValueError(f"--target-modules {bad}: the model's linear layers are {', '.join(LLAMA_LINEARS)}")
    for name in ("r", "lora_alpha", "max_length", "batch_size", "grad_accum", "eval_steps", "save_steps"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", opts.device):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {opts.device!r}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {opts.device} requested but CUDA is not available")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {opts.threads}")
    for name in ("lr", "epochs", "time_budget"):
        value = getattr(opts, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if opts.stop_after_steps is not None and opts.stop_after_steps < 1:
        raise ValueError(f"--stop-after-steps must be >= 1, got {opts.stop_after_steps}")
    if not 0 <= opts.lora_dropout < 1:
        raise ValueError("--lora-dropout must be in [0, 1)")
    if not 0 < opts.eval_fraction < 1:
        raise ValueError("--eval-fraction must be in (0, 1)")


def _datasets(opts: TrainOptions, tokenizer):
    # Every example is checked before the split, so an invalid one is named as such (not "too few").
    per_row = encode_rows(read_jsonl(opts.data), tokenizer, opts.max_length, opts.data)
    if opts.eval_data:
        train = [w for windows in per_row for w in windows]
        evals = encode_examples(read_jsonl(opts.eval_data), tokenizer, opts.max_length, opts.eval_data)
    else:  # a seeded split of the data (whole rows, before windowing)
        g = torch.Generator().manual_seed(opts.seed)
        order = torch.randperm(len(per_row), generator=g).tolist()
        n_eval = max(1, int(round(len(per_row) * opts.eval_fraction)))
        if n_eval >= len(per_row):
            raise DataError(f"{opts.data}: {len(per_row)} valid example(s), too few to hold {n_eval} out for "
                            "evaluation; add examples or give --eval-data")
        evals = [w for i in order[:n_eval] for w in per_row[i]]
        train = [w for i in order[n_eval:] for w in per_row[i]]
    for name, windows, source in (("training", train, opts.data), ("evaluation", evals, opts.eval_data or opts.data)):
        if not windows:
            raise DataError(f"{source}: no {name} example has 2 or more tokens")
    return train, evals


def _checkpointing_args(opts: TrainOptions, args_cls) -> dict:
    """TrainingArguments for activation (gradient) checkpointing, under this transformers' name."""
    on = opts.base_quantization != "none" if opts.gradient_checkpointing == "auto" else \
        opts.gradient_checkpointing == "on"
    name = "activation_checkpointing" if "activation_checkpointing" in args_cls.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def train(opts: TrainOptions, progress: bool = True) -> dict:
    """Fine-tune; returns a summary (also written to OUT/train_summary.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from sarathi.model_executor.model_loader import resolve_model_dir
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    _check(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model_dir = resolve_model_dir(opts.base)
    tokenizer = get_tokenizer(model_dir)
    train_set, eval_set = _datasets(opts, tokenizer)
    inputs = [opts.base, model_dir, opts.data] + ([opts.eval_data] if opts.eval_data else [])
    out = working_output_dir(opts.out, "lora-train", inputs)  # made (marked) only once the data is valid
    set_seed(opts.seed)
    model = load_base(opts, model_dir)
    if opts.base_quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=opts.r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=list(opts.target_modules), task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    device = _device(opts.device)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=opts.batch_size, per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, num_train_epochs=opts.epochs,
        max_steps=opts.max_steps, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        logging_steps=opts.logging_steps, eval_strategy="steps", eval_steps=opts.eval_steps,
        save_strategy="steps", save_steps=opts.save_steps, save_total_limit=2, seed=opts.seed,
        data_seed=opts.seed, report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=not progress, remove_unused_columns=False,
        label_names=["labels"], prediction_loss_only=True, **_checkpointing_args(opts, TrainingArguments))
    start = time.monotonic()
    history: List[dict] = []

    class Progress(TrainerCallback):
        """tokens/s in the logs (and the progress bar); the time budget and session stop."""

        def __init__(self):
            self.t0, self.tokens0, self.steps = time.monotonic(), 0, 0

        def on_train_begin(self, args_, state, control, **kw):
            self.t0, self.tokens0 = time.monotonic(), int(state.num_input_tokens_seen or 0)

        def on_step_end(self, args_, state, control, **kw):
            self.steps += 1
            over_budget = opts.time_budget is not None and time.monotonic() - start > opts.time_budget * 60
            if over_budget or (opts.stop_after_steps is not None and self.steps >= opts.stop_after_steps):
                control.should_training_stop = True
                control.should_save = True   # the final evaluation follows train()

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs is None:
                return
            seen = int(state.num_input_tokens_seen or 0)
            if "loss" in logs:
                logs["tokens_per_s"] = round((seen - self.tokens0) / max(time.monotonic() - self.t0, 1e-9), 1)
                self.train_rss = max(getattr(self, "train_rss", 0), _rss_mb())
            history.append(dict(logs, step=state.global_step, tokens=seen))

    progress_cb = Progress()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                             else tokenizer.eos_token_id),
                      callbacks=[progress_cb])
    resume = opts.resume and any(p.name.startswith("checkpoint-") for p in out.iterdir())
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    final_eval = trainer.evaluate()
    model.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors
    summary = {
        "options": asdict(opts), "trainable_params": trainable, "global_step": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0), "train_seconds": time.monotonic() - start,
        "train_loss": result.training_loss, "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mb": getattr(progress_cb, "train_rss", None), "resumed": resume,
        "history": history,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
