"""Quantize a Llama-family HF checkpoint with RTN, AWQ or GPTQ into a GPTQ-v1 or AWQ-GEMM checkpoint.

The float model is HF transformers' ``LlamaForCausalLM`` (float32). Calibration windows go
through the embeddings once; then the decoder layers run one at a time on the captured hidden
states (with the attention mask / rotary embeddings the model itself passed to layer 0), and
forward pre-hooks on the linears accumulate per-input statistics (``sum x x^T`` and ``sum |x|``).
Nothing is written until every layer is done: the checkpoint is assembled in a temporary sibling
of ``--out`` and renamed into place.
"""
from __future__ import annotations

import fnmatch
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from adaptivocab import outdir
from sarathi.model_executor.checkpoint_check import check_model_dir
from sarathi.quantize.algorithms import (QuantResult, QuantSpec, awq_search_clip, awq_search_scales,
                                         gptq_quantize, output_error, rtn_quantize)
from sarathi.quantize.calib import QuantizeError, calibration_windows
from sarathi.quantize.packing import pack_awq, pack_gptq

METHODS = ("rtn", "awq", "gptq")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears reading the same input, in the order a Llama decoder layer calls them.
INPUT_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_COPY_PATTERNS = ("tokenizer*", "patch_tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                  "chat_template*", "generation_config.json", "*.tiktoken", "*.model")


@dataclass
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    damp: float = 0.01
    num_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    batch_size: int = 8
    awq_grid: int = 20
    awq_clip: bool = True
    true_sequential: bool = True
    threads: Optional[int] = None     # torch intra-op threads while quantizing (None: leave as is)
    lm_head: bool = False             # also quantize the LM head (RTN; GPTQModel's `lm_head` option)


@dataclass
class LinearReport:
    name: str
    weight_error: float                  # ||W' - W||_F / ||W||_F
    output_error: Optional[float]        # sqrt(tr(dW H dW^T) / tr(W H W^T)) on calibration inputs


@dataclass
class QuantizeReport:
    method: str
    bits: int
    group_size: int
    out_dir: Path
    seconds: float = 0.0
    num_samples: int = 0
    seq_len: int = 0
    linears: List[LinearReport] = field(default_factory=list)

    @property
    def avg_weight_error(self) -> float:
        return sum(r.weight_error for r in self.linears) / max(len(self.linears), 1)

    @property
    def avg_output_error(self) -> Optional[float]:
        vals = [r.output_error for r in self.linears if r.output_error is not None]
        return sum(vals) / len(vals) if vals else None

    def summary_line(self) -> str:
        calib = (f", calibration {self.num_samples} x {self.seq_len} tokens" if self.num_samples else
                 ", no calibration")
        out = self.avg_output_error
        out_s = f"avg relative output error {out:.4f}, " if out is not None else ""
        return (f"{self.method}: quantized {len(self.linears)} linear layers to {self.bits}-bit "
                f"(group {self.group_size}) in {self.seconds:.1f}s{calib}: {out_s}"
                f"avg relative weight error {self.avg_weight_error:.4f} -> {self.out_dir}")


# --- validation ------------------------------------------------------------------------------------

def validate_options(opts: QuantizeOptions) -> None:
    if opts.method not in METHODS:
        raise QuantizeError(f"unknown method {opts.method!r}: expected one of {', '.join(METHODS)}")
    if opts.bits not in (4, 8):
        raise QuantizeError(f"--bits {opts.bits} is not supported: use 4 or 8")
    if opts.method == "awq" and opts.bits != 4:
        raise QuantizeError(f"--method awq writes AutoAWQ GEMM checkpoints, which are 4-bit only (got --bits {opts.bits})")
    if opts.group_size != -1 and opts.group_size <= 0:
        raise QuantizeError(f"--group-size must be a positive number of input columns or -1, got {opts.group_size}")
    if opts.method == "awq" and opts.group_size == -1:
        raise QuantizeError("--method awq needs a positive --group-size (AWQ GEMM kernels have no per-row mode)")
    if opts.desc_act and opts.method != "gptq":
        raise QuantizeError(f"--desc-act (act-order) only applies to --method gptq, not {opts.method}")
    if opts.num_samples < 1:
        raise QuantizeError(f"--num-samples must be >= 1, got {opts.num_samples}")
    if opts.seq_len < 2:
        raise QuantizeError(f"--seq-len must be >= 2, got {opts.seq_len}")
    if not (0 < opts.damp <= 1):
        raise QuantizeError(f"--damp must be in (0, 1], got {opts.damp}")
    if opts.batch_size < 1:
        raise QuantizeError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.method == "awq" and not 1 <= opts.awq_grid <= 1000:
        raise QuantizeError(f"--awq-grid must be in [1, 1000], got {opts.awq_grid}")
    if opts.lm_head and opts.method == "awq":
        raise QuantizeError("--lm-head writes a GPTQ-format head: use --method rtn or gptq (AutoAWQ has no "
                            "quantized LM head)")
    if opts.threads is not None and opts.threads < 1:
        raise QuantizeError(f"--threads must be >= 1, got {opts.threads}")
    if opts.device not in ("auto", "cpu", "cuda") and not opts.device.startswith("cuda:"):
        raise QuantizeError(f"--device must be auto, cpu or cuda[:N], got {opts.device!r}")


def _weight_files(model_dir: Path) -> List[Path]:
    from sarathi.model_executor.checkpoint_check import safetensors_files

    try:
        return safetensors_files(model_dir)
    except ValueError as e:
        raise QuantizeError(str(e)) from None


def inspect_checkpoint(model_dir: Path) -> Tuple[dict, Dict[str, Tuple[int, ...]]]:
    """config.json and the shape of every tensor (read from the safetensors headers only)."""
    from safetensors import safe_open

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise QuantizeError(f"cannot read {str(model_dir / 'config.json')!r}: {e}") from None
    if not isinstance(config, dict):
        raise QuantizeError(f"{str(model_dir / 'config.json')!r} is not a JSON object")
    if config.get("quantization_config"):
        raise QuantizeError(f"model {str(model_dir)!r} is already quantized "
                            f"({config['quantization_config'].get('quant_method', '?')}); pass a float checkpoint")
    arch = config.get("model_type")
    if arch != "llama":
        raise QuantizeError(f"model {str(model_dir)!r} has model_type {arch!r}; only Llama-family ('llama') "
                            "checkpoints are supported")
    try:  # hyperparameters in range and the safetensors headers bounded before anything is read
        check_model_dir(model_dir, config)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in _weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001 - a corrupt file is a bad input
            raise QuantizeError(f"cannot read safetensors file {str(f)!r}: {e}") from None
    return config, shapes


def check_shapes(config: dict, shapes: Dict[str, Tuple[int, ...]], opts: QuantizeOptions) -> None:
    """Every quantized tensor must exist, be split evenly into groups and pack into int32 words."""
    per = 32 // opts.bits
    n_layers = int(config.get("num_hidden_layers", 0))
    in_dims = set()
    for i in range(n_layers):
        for lin in LINEAR_NAMES:
            name = f"model.layers.{i}.{lin}.weight"
            if name not in shapes:
                raise QuantizeError(f"tensor {name} is missing from the checkpoint")
            if len(shapes[name]) != 2:
                raise QuantizeError(f"tensor {name} has shape {shapes[name]}, expected a 2-D weight")
            in_dims.add(shapes[name][1])
    for i in range(n_layers):
        for lin in LINEAR_NAMES:
            name = f"model.layers.{i}.{lin}.weight"
            out_f, in_f = shapes[name]
            if opts.group_size != -1 and in_f % opts.group_size:
                ok = [g for g in (256, 128, 64, 32, 16) if all(d % g == 0 for d in in_dims)]
                hint = f"; divisors that fit every layer: {', '.join(map(str, ok))}" if ok else ""
                raise QuantizeError(f"--group-size {opts.group_size} does not divide the input dimension {in_f} "
                                    f"of tensor {name} (shape {list(shapes[name])}){hint}, or use -1 for one "
                                    "group per row")
            if in_f % per and opts.method != "awq":
                raise QuantizeError(f"tensor {name}: input dimension {in_f} is not a multiple of {per} "
                                    f"({opts.bits}-bit values per int32)")
            if out_f % per:
                raise QuantizeError(f"tensor {name}: output dimension {out_f} is not a multiple of {per} "
                                    f"({opts.bits}-bit values per int32)")


def check_output_dir(out_dir, inputs: Sequence, overwrite: bool) -> Path:
    """Absolute `out_dir` after the safe-output rules (adaptivocab.outdir); QuantizeError otherwise."""
    try:
        return outdir.check_output_dir(out_dir, overwrite, inputs)
    except ValueError as e:
        raise QuantizeError(str(e)) from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuantizeError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


# --- running decoder layers one at a time ----------------------------------------------------------

class _Stop(Exception):
    pass


class LayerRunner:
    """Holds the hidden states entering the current decoder layer, batch by batch."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int, device: torch.device):
        self.inputs: List[Tuple[torch.Tensor, dict]] = []
        captured = {}

        def catch(_module, args, kwargs):
            kw = dict(kwargs)
            hs = args[0] if args else kw.pop("hidden_states")
            for key in ("cache", "past_key_values", "past_key_value"):
                if key in kw:
                    kw[key] = None
            kw["use_cache"] = False
            captured["x"] = (hs.detach(), kw)
            raise _Stop

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for b in range(0, windows.shape[0], batch_size):
                try:
                    model.model(input_ids=windows[b:b + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
                self.inputs.append(captured.pop("x"))
        finally:
            handle.remove()

    def run(self, layer, taps: Dict[torch.nn.Module, Callable[[torch.Tensor], None]],
            stop_after: Optional[torch.nn.Module] = None) -> List[torch.Tensor]:
        """Run `layer` on every batch; taps see each tapped linear's 2-D input. Stops a batch early at
        `stop_after` (its input is tapped first); returns the layer outputs otherwise."""
        handles = []
        for mod, fn in taps.items():
            def hook(m, args, fn=fn):
                x = args[0]
                fn(x.reshape(-1, x.shape[-1]))
                if m is stop_after:
                    raise _Stop
            handles.append(mod.register_forward_pre_hook(hook))
        outs = []
        try:
            for hs, kw in self.inputs:
                try:
                    o = layer(hs, **kw)
                except _Stop:
                    continue
                outs.append(o[0] if isinstance(o, tuple) else o)
        finally:
            for h in handles:
                h.remove()
        return outs

    def advance(self, outs: List[torch.Tensor]) -> None:
        self.inputs = [(o, kw) for o, (_, kw) in zip(outs, self.inputs)]


class InputStats:
    """Running sum x x^T and sum |x| over calibration tokens for one linear input."""

    def __init__(self, dim: int, device: torch.device):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.abssum = torch.zeros(dim, dtype=torch.float32, device=device)
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.float()
        self.xtx.addmm_(x.t(), x)
        self.abssum += x.abs().sum(0)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx / max(self.n, 1)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.n, 1)


def _rel_errors(W: torch.Tensor, W_hat: torch.Tensor, H: Optional[torch.Tensor]) -> Tuple[float, float]:
    dW = W_hat - W
    werr = float(dW.norm() / W.norm().clamp(min=1e-30))
    if H is None:
        return werr, None
    num = float(output_error(dW, H))
    den = float(output_error(W, H))
    return werr, math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


# --- the methods --------------------------------------------------------------------------------------

def _spec(opts: QuantizeOptions, in_features: int) -> QuantSpec:
    gs = in_features if opts.group_size == -1 else opts.group_size
    return QuantSpec(bits=opts.bits, group_size=gs, sym=opts.sym, v1_zeros=opts.method != "awq")


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        raise QuantizeError(f"tensor {name} contains NaN or Inf values")


def _quantize_layers(model, runner: Optional[LayerRunner], opts: QuantizeOptions, progress: bool,
                     results: Dict[str, QuantResult], reports: List[LinearReport]) -> None:
    """The one per-layer loop: each decoder layer is quantized by the method, then the next
    layer's inputs are taken (by the method) from this one."""
    from tqdm import tqdm

    quantize_layer = _awq_layer if opts.method == "awq" else _rtn_gptq_layer
    layers = model.model.layers
    for li, layer in enumerate(tqdm(layers, desc=f"{opts.method} {opts.bits}-bit", unit="layer",
                                    disable=not progress, file=sys.stderr)):
        mods = {n: layer.get_submodule(n) for n in LINEAR_NAMES}

        def record(n: str, res: QuantResult, W: torch.Tensor, W_eff: torch.Tensor, H: Optional[torch.Tensor],
                   li=li, mods=mods) -> None:
            """Keep `res` for linear `n` and put its dequantized weight into the model."""
            name = f"model.layers.{li}.{n}.weight"
            reports.append(LinearReport(name, *_rel_errors(W, W_eff, H)))
            results[f"model.layers.{li}.{n}"] = res
            mods[n].weight.data.copy_(res.weight.to(mods[n].weight.dtype))

        quantize_layer(model, runner, opts, li, layer, mods, record, last=li + 1 == len(layers))
    if opts.lm_head:
        # Round to nearest: the head is the last matmul, no later layer compensates; its weight
        # (the embedding's, when tied) stays as it is in the model.
        W = model.lm_head.weight.data.float()
        _check_finite("lm_head.weight", W)
        res = rtn_quantize(W, _spec(opts, W.shape[1]))
        reports.append(LinearReport("lm_head.weight", *_rel_errors(W, res.weight, None)))
        results["lm_head"] = res


def _rtn_gptq_layer(model, runner: Optional[LayerRunner], opts: QuantizeOptions, li: int, layer, mods: dict,
                    record: Callable, last: bool) -> None:
    dev = next(model.parameters()).device

    def quantize_group(group: Sequence[str], H: Optional[torch.Tensor]) -> None:
        for n in group:
            name = f"model.layers.{li}.{n}.weight"
            W = mods[n].weight.data.float()
            _check_finite(name, W)
            spec = _spec(opts, W.shape[1])
            if opts.method == "gptq":
                res = gptq_quantize(W, H, spec, damp=opts.damp, desc_act=opts.desc_act, name=name)
            else:
                res = rtn_quantize(W, spec)
            record(n, res, W, res.weight, H)

    if runner is None:
        for group in INPUT_GROUPS:
            quantize_group(group, None)
        return
    if opts.method == "rtn":
        # RTN ignores the data; calibration only measures the output error, on the float
        # layer's inputs (one forward per layer, float hidden states carried on, as for AWQ).
        stats = {g: InputStats(mods[g[0]].in_features, dev) for g in INPUT_GROUPS}
        outs = runner.run(layer, {mods[g[0]]: stats[g] for g in INPUT_GROUPS})
        for group in INPUT_GROUPS:
            quantize_group(group, stats[group].hessian)
        runner.advance(outs)
        return
    if opts.true_sequential:
        for group in INPUT_GROUPS:
            first = mods[group[0]]
            st = InputStats(first.in_features, dev)
            runner.run(layer, {first: st}, stop_after=first)
            quantize_group(group, st.hessian)
    else:
        stats = {g: InputStats(mods[g[0]].in_features, dev) for g in INPUT_GROUPS}
        runner.run(layer, {mods[g[0]]: stats[g] for g in INPUT_GROUPS})
        for group in INPUT_GROUPS:
            quantize_group(group, stats[group].hessian)
    if not last:
        runner.advance(runner.run(layer, {}))  # inputs of the next layer come from the quantized one


def _kv_shared(absmean: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Average o_proj input statistics over the query heads that share one kv head, so a scale
    folded into a v_proj row is the same for every o_proj column that reads it (GQA)."""
    hd = absmean.numel() // n_heads
    rep = n_heads // n_kv
    return absmean.view(n_kv, rep, hd).mean(1, keepdim=True).expand(n_kv, rep, hd).reshape(-1)


def _awq_layer(model, runner: LayerRunner, opts: QuantizeOptions, li: int, layer, mods: dict,
               record: Callable, last: bool) -> None:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    dev = next(model.parameters()).device
    for n, m in mods.items():
        _check_finite(f"model.layers.{li}.{n}.weight", m.weight.data)
    stats = {g: InputStats(mods[g[0]].in_features, dev) for g in INPUT_GROUPS}
    outs = runner.run(layer, {mods[g[0]]: stats[g] for g in INPUT_GROUPS})  # float layer (AutoAWQ)
    orig = {n: mods[n].weight.data.float().clone() for n in LINEAR_NAMES}
    H = {n: stats[g].hessian for g in INPUT_GROUPS for n in g}
    col = {n: torch.ones(mods[n].in_features, device=dev) for n in LINEAR_NAMES}
    row = {n: torch.ones(mods[n].out_features, device=dev) for n in LINEAR_NAMES}

    def search(group: Sequence[str], absmean: torch.Tensor) -> torch.Tensor:
        spec = _spec(opts, mods[group[0]].in_features)
        s, _, _, _ = awq_search_scales([orig[n] for n in group], H[group[0]], absmean, spec, opts.awq_grid)
        return s

    g_qkv, g_o, g_mlp, g_down = INPUT_GROUPS
    s_qkv = search(g_qkv, stats[g_qkv].absmean)
    v, o = mods["self_attn.v_proj"], mods["self_attn.o_proj"]
    fold_o = (n_heads % n_kv == 0 and o.in_features % n_heads == 0
              and v.out_features == n_kv * (o.in_features // n_heads))
    s_o = search(g_o, _kv_shared(stats[g_o].absmean, n_heads, n_kv)) if fold_o else None
    s_mlp = search(g_mlp, stats[g_mlp].absmean)
    s_down = search(g_down, stats[g_down].absmean)

    # Fold the scales the way AutoAWQ does; the float function of the layer is unchanged.
    layer.input_layernorm.weight.data.div_(s_qkv.to(layer.input_layernorm.weight.dtype))
    for n in g_qkv:
        col[n] = s_qkv
    if s_o is not None:
        hd = o.in_features // n_heads
        t = s_o.view(n_kv, n_heads // n_kv, hd)[:, 0, :].reshape(-1)
        row["self_attn.v_proj"] = 1 / t
        col["self_attn.o_proj"] = s_o
        if v.bias is not None:
            v.bias.data.div_(t)
    layer.post_attention_layernorm.weight.data.div_(s_mlp.to(layer.post_attention_layernorm.weight.dtype))
    for n in g_mlp:
        col[n] = s_mlp
    up = mods["mlp.up_proj"]
    row["mlp.up_proj"] = 1 / s_down
    col["mlp.down_proj"] = s_down
    if up.bias is not None:
        up.bias.data.div_(s_down)

    for n in LINEAR_NAMES:
        Ws = orig[n] * row[n][:, None] * col[n][None, :]           # the folded float weight
        Hs = H[n] / (col[n][:, None] * col[n][None, :])             # statistics of the folded input
        spec = _spec(opts, Ws.shape[1])
        clip = None
        if opts.awq_clip and n not in ("self_attn.q_proj", "self_attn.k_proj"):
            clip = awq_search_clip(Ws, Hs, spec, n_grid=opts.awq_grid)
        res = rtn_quantize(Ws, spec, clip)
        _check_finite(f"model.layers.{li}.{n}.weight", res.weight)
        W_eff = res.weight / row[n][:, None] / col[n][None, :]     # back in the original basis
        record(n, res, orig[n], W_eff, H[n])
    runner.advance(outs)


# --- writing -----------------------------------------------------------------------------------------

def _quant_config(opts: QuantizeOptions) -> dict:
    if opts.method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": opts.bits, "group_size": opts.group_size,
            "desc_act": bool(opts.desc_act), "sym": bool(opts.sym), "checkpoint_format": "gptq",
            "damp_percent": opts.damp, "static_groups": False, "true_sequential": bool(opts.true_sequential),
            "meta": {"quantizer": ["sarathi-quantize"], "method": opts.method}}


def _autogptq_quantize_config(opts: QuantizeOptions) -> dict:
    return {"bits": opts.bits, "group_size": opts.group_size, "damp_percent": opts.damp, "lm_head": bool(opts.lm_head),
            "desc_act": bool(opts.desc_act), "static_groups": False, "sym": bool(opts.sym),
            "true_sequential": bool(opts.true_sequential), "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    if not t.is_floating_point():
        return t.contiguous()
    h = t.to(torch.float16)
    if not bool(torch.isfinite(h).all()) and bool(torch.isfinite(t).all()):
        return t.float().contiguous()  # out of fp16 range: keep this one tensor in fp32
    return h.contiguous()


def build_tensors(model, original_keys: Sequence[str], results: Dict[str, QuantResult],
                  opts: QuantizeOptions) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = {}
    replaced = set()
    for prefix, res in results.items():
        q, zeros = res.q.cpu(), res.zeros.cpu()
        if opts.method == "awq":
            qweight, qzeros = pack_awq(q, zeros, 4)
        else:
            qweight, qzeros = pack_gptq(q, zeros, opts.bits)
        tensors[f"{prefix}.qweight"] = qweight
        tensors[f"{prefix}.qzeros"] = qzeros
        tensors[f"{prefix}.scales"] = res.scales.cpu().to(torch.float16).contiguous()
        if opts.method != "awq":
            tensors[f"{prefix}.g_idx"] = res.g_idx.cpu().to(torch.int32).contiguous()
        bias = getattr(model.get_submodule(prefix), "bias", None)
        if bias is not None:
            tensors[f"{prefix}.bias"] = _fp16(f"{prefix}.bias", bias.data)
        replaced.update({f"{prefix}.weight", f"{prefix}.bias"})
    state = model.state_dict()
    for key in original_keys:
        if key in replaced or key in tensors:
            continue
        if key not in state:
            raise QuantizeError(f"tensor {key} of the checkpoint is not part of the loaded model")
        tensors[key] = _fp16(key, state[key])
    return tensors


def write_checkpoint(out_dir: Path, model_dir: Path, tensors: Dict[str, torch.Tensor], config: dict,
                     opts: QuantizeOptions, overwrite: bool, inputs: Sequence = ()) -> None:
    from safetensors.torch import save_file

    try:
        with outdir.staged_output_dir(out_dir, "quantize", overwrite, [model_dir, *inputs]) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = dict(config)
            cfg["quantization_config"] = _quant_config(opts)
            if opts.lm_head:
                cfg["quantization_config"]["lm_head"] = True
                cfg["tie_word_embeddings"] = False  # the head is its own (quantized) tensor now
            cfg["torch_dtype"] = "float16"
            if "dtype" in cfg:
                cfg["dtype"] = "float16"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            if opts.method != "awq":
                (tmp / "quantize_config.json").write_text(
                    json.dumps(_autogptq_quantize_config(opts), indent=2) + "\n")
            for p in sorted(model_dir.iterdir()):
                if p.is_file() and p.name != "config.json" and any(fnmatch.fnmatch(p.name, pat)
                                                                   for pat in _COPY_PATTERNS):
                    shutil.copy2(p, tmp / p.name)
    except QuantizeError:
        raise
    except ValueError as e:  # the output rules, checked again before the swap
        raise QuantizeError(str(e)) from None


def _load_hf_model(model_dir: Path, device: torch.device):
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).eval()


# --- entry point ----------------------------------------------------------------------------------------

def quantize(model: str, out_dir, opts: QuantizeOptions, calib: Optional[str] = None, overwrite: bool = False,
             progress: bool = True) -> QuantizeReport:
    """Quantize `model` (alias, HF directory or GGUF) into `out_dir`; see `python -m sarathi.quantize -h`.

    Every input is checked before any work; on failure nothing is left at `out_dir`."""
    t0 = time.perf_counter()
    validate_options(opts)
    from sarathi.model_executor.model_loader import resolve_model_dir

    try:
        model_dir = resolve_model_dir(str(model))
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    inputs = [model_dir, model] + ([calib] if calib else [])
    out_dir = check_output_dir(out_dir, inputs, overwrite)
    config, shapes = inspect_checkpoint(model_dir)
    check_shapes(config, shapes, opts)
    if opts.method in ("awq", "gptq") and not calib:
        raise QuantizeError(f"--method {opts.method} needs calibration text: pass --calib FILE")
    max_pos = int(config.get("max_position_embeddings") or 0)
    if max_pos and opts.seq_len > max_pos:
        raise QuantizeError(f"--seq-len {opts.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    windows = calibration_windows(calib, model_dir, opts.num_samples, opts.seq_len, opts.seed) if calib else None
    if windows is not None and int(windows.max()) >= int(config.get("vocab_size", 1 << 62)):
        raise QuantizeError(f"the tokenizer of {str(model_dir)!r} produced ids beyond vocab_size {config['vocab_size']}")
    device = _device(opts.device)

    report = QuantizeReport(method=opts.method, bits=opts.bits, group_size=opts.group_size, out_dir=out_dir,
                            num_samples=0 if windows is None else opts.num_samples,
                            seq_len=0 if windows is None else opts.seq_len)
    results: Dict[str, QuantResult] = {}
    prev_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        with torch.no_grad():
            hf = _load_hf_model(model_dir, device)
            runner = LayerRunner(hf, windows, opts.batch_size, device) if windows is not None else None
            _quantize_layers(hf, runner, opts, progress, results, report.linears)
            del runner
            tensors = build_tensors(hf, list(shapes), results, opts)
    finally:
        torch.set_num_threads(prev_threads)
    write_checkpoint(out_dir, model_dir, tensors, config, opts, overwrite, inputs)
    report.seconds = time.perf_counter() - t0
    return report
