"""`sarathi quantize` (RTN / AWQ / GPTQ) on a tiny random Llama: checkpoint layouts, packing
against loop transcriptions of AutoGPTQ / AutoAWQ, dequantization accuracy, AWQ/GPTQ beating RTN,
act-order g_idx, bad inputs, atomic output. On the embedded SmolLM2-135M: RTN (fast, default run);
AWQ and GPTQ on all 30 layers are opt-in (SARATHI_QUANT_REAL=1, a few minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_LAYERS = 2
GS = 32


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small tensors and 2 shared cores: a second OpenMP thread costs far more than it brings."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _stdlib_text(*modules) -> str:
    import importlib

    return "\n".join(Path(importlib.import_module(m).__file__).read_text(encoding="utf-8") for m in modules)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    """Calibration-like text: Python sources with docstrings (always on disk, stable per Python)."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(_stdlib_text("argparse", "json.decoder", "textwrap"), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def heldout_windows(smollm2_dir, tmp_path_factory) -> torch.Tensor:
    from sarathi.quantize.calib import calibration_windows

    p = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    p.write_text(_stdlib_text("shutil", "dataclasses"), encoding="utf-8")
    return calibration_windows(p, smollm2_dir, 8, 64, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama (hidden 64, intermediate 128, 2 layers) with activation outliers like
    those of trained LLMs, so that activation-aware methods have something to find: RMSNorm
    weights make 4 input channels of every attention / MLP block 16x the typical magnitude, and 4
    up_proj rows are 6x larger (outlier channels at the down_proj input)."""
    from safetensors.torch import load_file, save_file

    d = make_tiny_llama(tmp_path_factory.mktemp("tiny-outliers"), smollm2_dir, seed=1)
    sd = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(N_LAYERS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = torch.ones(64)
            w[torch.randperm(64, generator=g)[:4]] = 16.0
            sd[f"model.layers.{i}.{norm}.weight"] = w
        sd[f"model.layers.{i}.mlp.up_proj.weight"][torch.randperm(128, generator=g)[:4]] *= 6.0
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _run(argv):
    from sarathi.quantize.__main__ import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def outputs(model_dir, calib_file, tmp_path_factory):
    """One run per configuration, shared by the tests below: name -> (out dir, report)."""
    from sarathi.quantize import QuantizeOptions, quantize

    base = tmp_path_factory.mktemp("quantized")
    runs = {
        "rtn": QuantizeOptions(method="rtn", bits=4, group_size=GS),
        "awq": QuantizeOptions(method="awq", bits=4, group_size=GS),
        "gptq": QuantizeOptions(method="gptq", bits=4, group_size=GS),
        "gptq_act_sym": QuantizeOptions(method="gptq", bits=4, group_size=GS, desc_act=True, sym=True),
        "rtn8_sym": QuantizeOptions(method="rtn", bits=8, group_size=GS, sym=True),
    }
    out = {}
    for name, opts in runs.items():
        opts.num_samples, opts.seq_len, opts.threads = 8, 64, 1
        report = quantize(str(model_dir), base / name, opts, calib=str(calib_file), progress=False)
        out[name] = (base / name, report)
    return out


def _tensors(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _float_weights(model_dir: Path):
    return _tensors(model_dir)


# --- packing -----------------------------------------------------------------------------------

def _ref_pack_gptq_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ QuantLinear.pack, as a plain loop: intweight [in, out], 32/bits input rows per word."""
    import numpy as np

    intweight = q.t().contiguous().numpy().astype(np.uint32)
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per
        row += 1
    return torch.from_numpy(qweight.astype(np.int32))


def _ref_pack_gptq_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ QuantLinear.pack's qzeros loop: zeros [groups, out] -> (zeros - 1) along out."""
    import numpy as np

    z = (zeros - 1).numpy().astype(np.uint32)
    per = 32 // bits
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= z[:, j] << (bits * (j - i))
        i += per
        col += 1
    return torch.from_numpy(qzeros.astype(np.int32))


def _ref_pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ WQLinear_GEMM.from_linear packing of intweight [rows, cols] along cols."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    iw = intweight.to(torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= iw[:, col * 8 + order_map[i]] << (i * 4)
    return packed


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_matches_autogptq_loop(bits):
    from sarathi.quantize import pack_gptq, unpack_gptq

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (24, 64), generator=g)
    zeros = torch.randint(1, 1 << bits, (2, 24), generator=g)
    qweight, qzeros = pack_gptq(q, zeros, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * bits // 32, 24)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (2, 24 * bits // 32)
    assert torch.equal(qweight, _ref_pack_gptq_qweight(q, bits))
    assert torch.equal(qzeros, _ref_pack_gptq_qzeros(zeros, bits))
    q2, z2 = unpack_gptq(qweight, qzeros, bits)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


def test_known_packed_words():
    from sarathi.quantize import pack_awq, pack_gptq

    ramp = torch.arange(8).view(1, 8)                       # q[o=0, i=0..7] = i
    qweight, qzeros = pack_gptq(ramp, torch.full((1, 8), 8), 4)
    assert qweight.flatten().tolist() == [0x76543210]       # low nibble = input row 0
    assert qzeros.flatten().tolist() == [0x77777777]        # sym 4-bit: zero 8 stored as 7
    awq_w, awq_z = pack_awq(ramp.t(), ramp, 4)              # q[o=j, i=0] = j
    assert awq_w.flatten().tolist() == [0x75316420]         # nibbles hold columns 0,2,4,6,1,3,5,7
    assert awq_z.flatten().tolist() == [0x75316420]
    with pytest.raises(ValueError):
        pack_gptq(ramp, torch.zeros(1, 8, dtype=torch.int64), 4)  # v1 cannot store a zero point of 0


def test_awq_packing_matches_autoawq_loop():
    from sarathi.quantize import pack_awq, unpack_awq

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=g)   # [out, in]
    zeros = torch.randint(0, 16, (2, 32), generator=g)
    qweight, qzeros = pack_awq(q, zeros)
    assert torch.equal(qweight, _ref_pack_awq(q.t()))
    assert torch.equal(qzeros, _ref_pack_awq(zeros))
    q2, z2 = unpack_awq(qweight, qzeros)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


# --- checkpoint layouts ------------------------------------------------------------------------

def _shapes(model_dir: Path):
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


@pytest.mark.parametrize("name,bits", [("rtn", 4), ("gptq", 4), ("gptq_act_sym", 4), ("rtn8_sym", 8)])
def test_gptq_layout(outputs, model_dir, name, bits):
    d, _ = outputs[name]
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    desc_act, sym = name == "gptq_act_sym", name in ("gptq_act_sym", "rtn8_sym")
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == \
        {"quant_method": "gptq", "bits": bits, "group_size": GS, "desc_act": desc_act, "sym": sym,
         "checkpoint_format": "gptq"}
    assert cfg["torch_dtype"] == "float16" and cfg["hidden_size"] == 64
    autogptq = json.loads((d / "quantize_config.json").read_text())
    assert {k: autogptq[k] for k in ("bits", "group_size", "desc_act", "sym", "static_groups")} == \
        {"bits": bits, "group_size": GS, "desc_act": desc_act, "sym": sym, "static_groups": False}
    t = _tensors(d)
    per = 32 // bits
    expected = set()
    for i in range(N_LAYERS):
        for lin, (out_f, in_f) in _shapes(model_dir).items():
            p = f"model.layers.{i}.{lin}"
            expected |= {f"{p}.qweight", f"{p}.qzeros", f"{p}.scales", f"{p}.g_idx"}
            assert t[f"{p}.qweight"].dtype == torch.int32 and t[f"{p}.qweight"].shape == (in_f // per, out_f)
            assert t[f"{p}.qzeros"].dtype == torch.int32 and t[f"{p}.qzeros"].shape == (in_f // GS, out_f // per)
            assert t[f"{p}.scales"].dtype == torch.float16 and t[f"{p}.scales"].shape == (in_f // GS, out_f)
            assert t[f"{p}.g_idx"].dtype == torch.int32 and t[f"{p}.g_idx"].shape == (in_f,)
            if sym:  # zero point 2^(bits-1), stored minus one in every slot
                word = 0x77777777 if bits == 4 else 0x7F7F7F7F
                assert (t[f"{p}.qzeros"] == word).all()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected.add(f"model.layers.{i}.{norm}.weight")
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    assert set(t) == expected  # tied lm_head is not written; no float copies of quantized linears
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].shape == (49152, 64)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f


def test_awq_layout(outputs, model_dir):
    d, _ = outputs["awq"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": GS, "zero_point": True, "version": "gemm"}
    assert not (d / "quantize_config.json").exists()
    t = _tensors(d)
    for i in range(N_LAYERS):
        for lin, (out_f, in_f) in _shapes(model_dir).items():
            p = f"model.layers.{i}.{lin}"
            assert t[f"{p}.qweight"].dtype == torch.int32 and t[f"{p}.qweight"].shape == (in_f, out_f // 8)
            assert t[f"{p}.qzeros"].dtype == torch.int32 and t[f"{p}.qzeros"].shape == (in_f // GS, out_f // 8)
            assert t[f"{p}.scales"].dtype == torch.float16 and t[f"{p}.scales"].shape == (in_f // GS, out_f)
            assert f"{p}.g_idx" not in t and f"{p}.weight" not in t


# --- dequantization accuracy -------------------------------------------------------------------

def _deq(t, p, bits, fmt, use_g_idx=True):
    from sarathi.quantize import dequantize_checkpoint_tensor

    return dequantize_checkpoint_tensor(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"],
                                        t.get(f"{p}.g_idx") if use_g_idx else None, bits=bits, fmt=fmt,
                                        group_size=GS)


@pytest.mark.parametrize("name,bits", [("rtn", 4), ("rtn8_sym", 8)])
def test_rtn_dequantizes_within_half_a_step(outputs, model_dir, name, bits):
    """Round-to-nearest: every weight is within half a step (its group's fp16 scale / 2) of its
    dequantized value, the range ends included."""
    d, _ = outputs[name]
    t, ref = _tensors(d), _float_weights(model_dir)
    for i in range(N_LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            W = ref[f"{p}.weight"].float()
            W_hat = _deq(t, p, bits, "gptq")
            step = t[f"{p}.scales"].float().repeat_interleave(GS, 0).t()
            assert ((W_hat - W).abs() <= step * (0.5 + 1e-4)).all(), p
            rel = float((W_hat - W).norm() / W.norm())
            assert rel < (0.1 if bits == 4 else 0.006), (p, rel)


def test_gptq_dequantizes_close(outputs, model_dir):
    d, _ = outputs["gptq"]
    t, ref = _tensors(d), _float_weights(model_dir)
    for i in range(N_LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            W = ref[f"{p}.weight"].float()
            assert torch.equal(t[f"{p}.g_idx"], torch.arange(W.shape[1], dtype=torch.int32) // GS)
            rel = float((_deq(t, p, 4, "gptq") - W).norm() / W.norm())
            assert rel < 0.3, (p, rel)  # GPTQ trades weight error for output error


def test_desc_act_g_idx(outputs, model_dir):
    """Act-order: g_idx is a non-trivial grouping of the input columns (each group still holds
    group_size columns) and the weights dequantize correctly only through it."""
    d, _ = outputs["gptq_act_sym"]
    t, ref = _tensors(d), _float_weights(model_dir)
    ratios = []
    for i in range(N_LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            W = ref[f"{p}.weight"].float()
            g_idx = t[f"{p}.g_idx"].long()
            assert torch.equal(torch.bincount(g_idx), torch.full((W.shape[1] // GS,), GS))
            assert not torch.equal(g_idx, torch.arange(W.shape[1]) // GS), p
            good = float((_deq(t, p, 4, "gptq") - W).norm() / W.norm())
            wrong = float((_deq(t, p, 4, "gptq", use_g_idx=False) - W).norm() / W.norm())
            assert good < 0.3 and wrong > good, (p, good, wrong)
            ratios.append(wrong / good)
    assert sum(ratios) / len(ratios) > 1.2, ratios


def test_desc_act_roundtrip_exact():
    """GPTQ with act-order on a layer whose input channels differ 100x in energy: the packed
    checkpoint tensors dequantize (through g_idx) to exactly the weights GPTQ produced, columns are
    grouped by decreasing diag(H), and ignoring g_idx is badly wrong."""
    from sarathi.quantize import dequantize_checkpoint_tensor, pack_gptq
    from sarathi.quantize.algorithms import QuantSpec, gptq_quantize

    g = torch.Generator().manual_seed(0)
    cols, gs = 128, 32
    X = torch.randn(512, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    W = torch.randn(48, cols, generator=g) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    H = X.t() @ X / X.shape[0]
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=gs, sym=False, v1_zeros=True), desc_act=True)
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(res.g_idx.long()[order], torch.arange(cols) // gs)
    qweight, qzeros = pack_gptq(res.q, res.zeros, 4)
    scales = res.scales.to(torch.float16)
    deq = dequantize_checkpoint_tensor(qweight, qzeros, scales, res.g_idx, bits=4)
    assert torch.allclose(deq, res.weight, rtol=0, atol=1e-6)
    wrong = dequantize_checkpoint_tensor(qweight, qzeros, scales, None, bits=4, group_size=gs)
    assert float((wrong - W).norm()) > 3 * float((deq - W).norm())


def test_awq_dequantizes_close_after_unfolding(outputs, model_dir):
    """AWQ weights are stored times the per-input-channel scales s that were divided out of the
    preceding RMSNorm: q/k (and gate) recover the float weights as W_deq / s."""
    d, _ = outputs["awq"]
    t, ref = _tensors(d), _float_weights(model_dir)
    for i in range(N_LAYERS):
        # v_proj / up_proj rows also carry the o_proj / down_proj scales; q, k, gate only the norm's
        for norm, lins in (("input_layernorm", LINEARS[:2]), ("post_attention_layernorm", LINEARS[4:5])):
            s = ref[f"model.layers.{i}.{norm}.weight"].float() / t[f"model.layers.{i}.{norm}.weight"].float()
            assert float(s.max() / s.min()) > 1.5  # the outlier channels were scaled up
            for lin in lins:
                p = f"model.layers.{i}.{lin}"
                W = ref[f"{p}.weight"].float()
                rel = float((_deq(t, p, 4, "awq") / s - W).norm() / W.norm())
                assert rel < 0.15, (p, rel)


# --- quality: AWQ and GPTQ beat RTN ------------------------------------------------------------

def _layer_errors(float_model, quant_model, windows):
    """Per decoder layer: both layers get the float model's input hidden states h; relative error
    of the quantized layer's update (out - h) against the float one."""
    errs = []
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: captured.append((a[0] if a else k["hidden_states"], k)),
                                             with_kwargs=True) for layer in float_model.model.layers]
    with torch.no_grad():
        float_model(windows)
        for h in hooks:
            h.remove()
        for li, (h, kw) in enumerate(captured):
            ref = float_model.model.layers[li](h, **kw)
            out = quant_model.model.layers[li](h, **kw)
            ref = ref[0] if isinstance(ref, tuple) else ref
            out = out[0] if isinstance(out, tuple) else out
            errs.append(float((out - ref).norm() / (ref - h).norm()))
    return sum(errs) / len(errs)


def _linear_errors(float_model, W_hat, windows):
    """Average over linears of ||x (W_hat - W)^T|| / ||x W^T|| with x the float model's inputs to
    that linear on `windows` (W_hat: name -> dequantized weight in the float basis)."""
    xs, hooks = {}, []

    def tap(name):
        def hook(_module, args):
            xs[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    for name, mod in float_model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name + ".weight" in W_hat and name.startswith("model.layers."):
            hooks.append(mod.register_forward_pre_hook(tap(name)))
    with torch.no_grad():
        float_model(windows)
    for h in hooks:
        h.remove()
    errs = []
    for name, x in xs.items():
        W = float_model.get_submodule(name).weight.detach()
        errs.append(float((x @ (W_hat[name + ".weight"] - W).t()).norm() / (x @ W.t()).norm()))
    return sum(errs) / len(errs)


def test_awq_and_gptq_beat_rtn(outputs, model_dir, heldout_windows):
    from transformers import LlamaForCausalLM

    from sarathi.quantize import load_dequantized_model

    fp = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    err = {m: _layer_errors(fp, load_dequantized_model(outputs[m][0]), heldout_windows)
           for m in ("rtn", "awq", "gptq")}
    print("layer errors", err)
    assert err["awq"] < 0.9 * err["rtn"], err
    assert err["gptq"] < 0.9 * err["rtn"], err
    # per linear, on held-out float inputs, straight from the checkpoints (GPTQ/RTN keep the basis)
    from sarathi.quantize import dequantize_checkpoint

    lin = {m: _linear_errors(fp, dequantize_checkpoint(outputs[m][0]), heldout_windows) for m in ("rtn", "gptq")}
    print("linear errors", lin)
    assert lin["gptq"] < 0.85 * lin["rtn"], lin
    # the quantizer's own report (linear outputs on the calibration inputs) agrees
    rep = {m: outputs[m][1].avg_output_error for m in ("rtn", "awq", "gptq")}
    assert rep["awq"] < rep["rtn"] and rep["gptq"] < rep["rtn"], rep


def test_dequantized_model_tracks_float_logits(outputs, model_dir, heldout_windows):
    """End to end through the dequantized checkpoints. This random model amplifies weight noise
    (fp16-rounding its linears alone moves the logits by ~0.2%) and 4-bit errors saturate, so the
    bounds are loose; 8-bit must be several times closer than 4-bit."""
    from transformers import LlamaForCausalLM

    from sarathi.quantize import load_dequantized_model

    fp = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    x = heldout_windows[:2]
    rel = {}
    with torch.no_grad():
        ref = fp(x).logits
        for name in ("rtn8_sym", "rtn", "gptq", "awq", "gptq_act_sym"):
            lg = load_dequantized_model(outputs[name][0])(x).logits
            rel[name] = float((lg - ref).norm() / ref.norm())
    assert rel["rtn8_sym"] < 0.3 * rel["rtn"], rel
    assert all(v < 0.8 for v in rel.values()), rel


@pytest.mark.parametrize("name,pkg", [("gptq", "gptqmodel"), ("awq", "gptqmodel")])
def test_transformers_loads_checkpoint(outputs, name, pkg, heldout_windows):
    """transformers reads GPTQ/AWQ checkpoints only through optimum + gptqmodel (+ accelerate)."""
    for mod in ("optimum", pkg, "accelerate"):
        pytest.importorskip(mod, reason=f"transformers needs {mod!r} to load {name} checkpoints; not installed")
    from transformers import AutoModelForCausalLM

    from sarathi.quantize import load_dequantized_model

    d = outputs[name][0]
    model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():
        ref = load_dequantized_model(d, torch.float16)(heldout_windows[:1]).logits.float()
        lg = model(heldout_windows[:1].to(model.device)).logits.float().cpu()
    assert float((lg - ref).norm() / ref.norm()) < 0.05


# --- CLI, dispatch, bad inputs, atomic output --------------------------------------------------

def test_cli_dispatch_subprocess(model_dir, tmp_path):
    out = tmp_path / "rtn-cli"
    r = subprocess.run([sys.executable, "-m", "sarathi", "quantize", "--model", str(model_dir), "--method", "rtn",
                        "--group-size", "32", "--out", str(out), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("rtn: quantized 14 linear layers to 4-bit (group 32) in ") and "weight error" in last
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def _assert_nothing_written(parent: Path, keep=()):
    left = sorted(p.name for p in parent.iterdir() if p.name not in keep)
    assert left == [], left


@pytest.fixture
def bad_inputs(tmp_path):
    files = {
        "empty": b"",
        "blank": b"   \n\n",
        "binary": b"hello\x00world " * 100,
        "latin1": ("caf\u00e9 na\u00efve " * 200).encode("latin-1"),
        "short": b"just a few words",
    }
    d = tmp_path / "inputs"
    d.mkdir()
    for k, v in files.items():
        (d / f"{k}.txt").write_bytes(v)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    return d, out_parent


@pytest.mark.parametrize("extra,calib,needle", [
    (["--bits", "3"], "good", "--bits 3 is not supported"),
    (["--method", "awq", "--bits", "8"], "good", "4-bit only"),
    (["--group-size", "48"], "good", "model.layers.0.self_attn.q_proj.weight"),
    (["--group-size", "0"], "good", "--group-size"),
    ([], "empty", "empty.txt' is empty"),
    ([], "blank", "blank.txt' is empty"),
    ([], "binary", "binary.txt' looks binary"),
    ([], "latin1", "latin1.txt' is not UTF-8"),
    ([], "short", "short.txt' is too short"),
    ([], "missing", "missing.txt' does not exist"),
    (["--method", "rtn", "--desc-act"], "good", "--desc-act"),
    (["--method", "awq"], None, "needs calibration text"),
    (["--seq-len", "4096"], "good", "max_position_embeddings"),
])
def test_bad_inputs(model_dir, calib_file, bad_inputs, capsys, extra, calib, needle):
    d, out_parent = bad_inputs
    argv = ["--model", model_dir, "--method", "gptq", "--group-size", "32", "--out", out_parent / "q",
            "--seq-len", "64", "--quiet"]
    if calib is not None:
        argv += ["--calib", calib_file if calib == "good" else d / f"{calib}.txt"]
    argv += extra  # later flags win
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err
    _assert_nothing_written(out_parent)


def test_unknown_method_and_missing_model(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(["--model", model_dir, "--method", "squeeze", "--out", tmp_path / "q"])
    assert e.value.code == 2 and "invalid choice: 'squeeze'" in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    assert _run(["--model", missing, "--method", "rtn", "--group-size", "32", "--out", tmp_path / "q"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_binary_weights_file_rejected(model_dir, tmp_path, capsys):
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert _run(["--model", bad, "--method", "rtn", "--group-size", "32", "--out", tmp_path / "q"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_refuses_to_overwrite_without_flag(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["--model", model_dir, "--method", "rtn", "--group-size", "32", "--out", out, "--quiet"]
    assert _run(argv) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    # Not ours (no marker): --overwrite refuses too, and the file survives.
    assert _run(argv + ["--overwrite"]) == 2
    assert "not written by this project" in capsys.readouterr().err and (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    assert _run(argv + ["--overwrite"]) == 0  # an empty directory holds nothing to lose
    assert _run(argv + ["--overwrite"]) == 0  # our own earlier output is replaced
    assert (out / "model.safetensors").is_file()
    assert "rtn: quantized 14 linear layers" in capsys.readouterr().out
    _assert_nothing_written(tmp_path, keep=("q",))


def test_failure_midway_leaves_nothing(model_dir, calib_file, tmp_path, monkeypatch):
    import sarathi.quantize.core as core

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(core.shutil, "copy2", boom)  # fails while the temp dir is being filled
    opts = core.QuantizeOptions(method="gptq", group_size=GS, num_samples=2, seq_len=32, threads=1)
    with pytest.raises(RuntimeError, match="disk full"):
        core.quantize(str(model_dir), tmp_path / "q", opts, calib=str(calib_file), progress=False)
    _assert_nothing_written(tmp_path)


# --- the real embedded model ----------------------------------------------------------------------

def _perplexity(model, windows) -> float:
    import math

    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(windows), 4):
            x = windows[b:b + 4]
            lp = torch.log_softmax(model(x).logits.float()[:, :-1], -1).gather(-1, x[:, 1:, None])
            total -= float(lp.sum())
            n += lp.numel()
    return math.exp(total / n)


@pytest.fixture(scope="module")
def smollm2_fp_ppl(smollm2_dir, heldout_windows):
    from transformers import LlamaForCausalLM

    fp = LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return _perplexity(fp, heldout_windows[:4])


@pytest.mark.slow
def test_real_smollm2_rtn(smollm2_dir, smollm2_fp_ppl, heldout_windows, tmp_path, capsys):
    """The embedded SmolLM2-135M, RTN without calibration (~10 s): a loadable 4-bit checkpoint
    whose held-out perplexity stays near the float model's (measured: 11.1 -> 14.7 with group 64)."""
    from sarathi.quantize import load_dequantized_model

    # 128 does not divide SmolLM2's hidden size 576: the error names the tensor and suggests 64
    assert _run(["--model", "smollm2-135m-instruct", "--method", "rtn", "--out", tmp_path / "q128"]) == 2
    assert "model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().err
    assert _run(["--model", "smollm2-135m-instruct", "--method", "rtn", "--group-size", "64",
                 "--out", tmp_path / "rtn", "--quiet", "--threads", "1"]) == 0
    assert "rtn: quantized 210 linear layers" in capsys.readouterr().out
    ppl = _perplexity(load_dequantized_model(tmp_path / "rtn"), heldout_windows[:4])
    assert smollm2_fp_ppl < ppl < 1.6 * smollm2_fp_ppl, (smollm2_fp_ppl, ppl)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SARATHI_QUANT_REAL") != "1",
                    reason="AWQ+GPTQ on all 30 SmolLM2 layers take ~4 min on 2 busy cores; set SARATHI_QUANT_REAL=1")
def test_real_smollm2_awq_gptq_beat_rtn(smollm2_dir, tmp_path, capsys):
    """Held-out perplexity on 16 x 256-token windows (measured: fp32 14.3, RTN 19.0, GPTQ 16.7;
    a handful of 64-token windows is too noisy, and short contexts weigh the first positions,
    which 256-token calibration windows barely cover)."""
    from transformers import LlamaForCausalLM

    from sarathi.quantize import load_dequantized_model
    from sarathi.quantize.calib import calibration_windows

    (tmp_path / "calib.txt").write_text(_stdlib_text("argparse", "json.decoder", "textwrap", "functools", "typing"),
                                        encoding="utf-8")
    (tmp_path / "heldout.txt").write_text(_stdlib_text("shutil", "dataclasses"), encoding="utf-8")
    windows = calibration_windows(tmp_path / "heldout.txt", smollm2_dir, 16, 256, seed=7)
    fp = LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ppl, lines = {"fp32": _perplexity(fp, windows)}, {}
    for method in ("rtn", "awq", "gptq"):
        argv = ["--model", "smollm2-135m-instruct", "--method", method, "--group-size", "64", "--calib",
                tmp_path / "calib.txt", "--out", tmp_path / method, "--num-samples", "16", "--seq-len", "256",
                "--quiet", "--threads", "1"]
        assert _run(argv) == 0
        lines[method] = capsys.readouterr().out.strip().splitlines()[-1]
        ppl[method] = _perplexity(load_dequantized_model(tmp_path / method), windows)
    with capsys.disabled():
        print("", ppl, *lines.values(), sep="\n")
    assert ppl["fp32"] < ppl["awq"] < ppl["rtn"] and ppl["fp32"] < ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["rtn"] < 1.6 * ppl["fp32"], ppl
