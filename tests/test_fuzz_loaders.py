"""Loader fuzzing: mutated GGUF files, HF safetensors directories, GPTQ checkpoints and PEFT adapters,
each loaded in a forked child under an address-space limit and an alarm (tests/loader_fuzz_worker.py).

The mutations follow the formats' own fields: every numeric field of the GGUF header (counts,
string and array lengths, metadata values, tensor dims, types and offsets) set to boundary values
(0, 1, all ones, 2^31-1, ...), every hyperparameter of config.json and quantization_config and
every field of adapter_config.json given values of the wrong type or out of range, safetensors
headers with bad dtypes / shapes / offsets, weights scaled by 1e30 or made NaN, truncations and
byte flips. Each input must load or fail with one ValueError line naming the file; a raw
exception, a crash, a hang or an allocation past the limit fails the test.

SARATHI_FUZZ_EXAMPLES scales the inputs per format (default 10, times 3 for GGUF); the summary
line is printed. Regression tests for the probe's findings follow the fuzzer.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("SARATHI_FUZZ_EXAMPLES", "10"))
# The tiny model's linears (in, out), as the engine hands them to load_adapter.
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, model_dir: Path, smollm2_gguf: Path) -> Path:
    """The tiny test model as a llama GGUF (F32 tensors) with SmolLM2's tokenizer metadata."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    # SmolLM2's tokenizer cut to the model's vocabulary (its first ids and the merges among them),
    # so converting a mutant takes a second, not the minute a 49k-token vocabulary takes.
    vocab = cfg["vocab_size"]
    src = gguf.GGUFReader(str(smollm2_gguf))
    tokens = src.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                value = value[:vocab]
            elif key == "tokenizer.ggml.merges":
                value = [m for m in value if len(m.split(" ")) == 2 and m.replace(" ", "") in known
                         and all(p in known for p in m.split(" "))]
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, field.types[0], sub_type=sub)
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            g = f"blk.{layer}.{_HF_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
        else:
            continue
        w.add_tensor(g, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Worker:
    """tests/loader_fuzz_worker.py in a subprocess: one JSON case in, one JSON result out."""

    def __init__(self, cache: Path):
        self.stderr = cache.parent / "case-stderr.txt"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SARATHI_CACHE": str(cache)}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loader_fuzz_worker.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, kind: str, path: Path) -> dict:
        case = {"kind": kind, "path": str(path), "stderr": str(self.stderr), "shapes": SHAPES, "num_layers": 2,
                "max_rank": 16}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fuzz worker died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_model_dir, smollm2_dir):
    from conftest import make_tiny_llama
    from lora_testutil import make_adapter
    from sarathi.model_executor.model_loader import _embedded_smollm2
    from sarathi.quantize.core import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp("fuzz-loaders")
    small = make_tiny_llama(root / "small-vocab", smollm2_dir, vocab_size=512)
    gguf_path = write_tiny_gguf(root / "tiny.gguf", small, _embedded_smollm2())
    adapter = make_adapter(tiny_model_dir, root / "adapter", seed=0, r=4, alpha=8)
    gptq = root / "gptq"
    quantize(str(tiny_model_dir), gptq, QuantizeOptions(method="rtn", group_size=32, threads=1), progress=False)
    worker = Worker(root / "cache")
    yield {"root": root, "gguf": gguf_path, "hf": tiny_model_dir, "adapter": adapter, "gptq": gptq,
           "worker": worker}
    worker.close()


# ---- mutators ---------------------------------------------------------------------------------

def gguf_numeric_fields(path: Path) -> List[tuple]:
    """(byte offset, numpy dtype, what) of every scalar the header stores: counts, lengths, values,
    tensor dims / types / offsets (large arrays: their type, length and first string length only)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    base = r.data.ctypes.data
    fields = []

    def add(parts, what):
        for i, part in enumerate(parts[:6]):
            if part.dtype.kind in "uif" and part.size == 1:
                fields.append((part.ctypes.data - base, part.dtype, f"{what} part {i}"))

    for name, field in r.fields.items():
        add(field.parts, name)
    for t in r.tensors:
        add(t.field.parts, f"tensor {t.name}")
    return fields


def hostile(dtype: np.dtype, orig, rnd: random.Random):
    if dtype.kind == "f":
        return rnd.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 3e38, 1e-45])
    bits = dtype.itemsize * 8
    top = (1 << bits) - 1 if dtype.kind == "u" else (1 << (bits - 1)) - 1
    low = 0 if dtype.kind == "u" else -(1 << (bits - 1))
    choice = rnd.choice([0, 1, top, top - 1, (1 << 31) - 1, (1 << 31), int(orig) + 1, int(orig) - 1,
                         int(orig) * 2, int(orig) * 1024, rnd.randint(low, top), low])
    return min(max(choice, low), top)


def mutate_gguf(seed: bytes, fields, rnd: random.Random) -> bytes:
    data = bytearray(seed)
    how = rnd.random()
    if how < 0.7:
        for _ in range(rnd.choice([1, 1, 2])):
            off, dtype, _ = rnd.choice(fields)
            orig = np.frombuffer(bytes(data[off:off + dtype.itemsize]), dtype=dtype)[0]
            data[off:off + dtype.itemsize] = np.array([hostile(dtype, orig, rnd)], dtype=dtype).tobytes()
        return bytes(data)
    if how < 0.85:
        return bytes(data[:rnd.randint(0, len(data) - 1)])
    for _ in range(rnd.randint(1, 8)):
        i = rnd.randint(0, min(len(data), 1 << 16) - 1)
        data[i] = rnd.randint(0, 255)
    return bytes(data)


CONFIG_BAD = [0, -1, (1 << 31) - 1, 1 << 63, 1.5, "x", None, [], {}, True, 1e308, float("nan")]


def mutate_hf_dir(seed: Path, out: Path, rnd: random.Random, config_keys: List[str]) -> None:
    out.mkdir()
    for p in seed.iterdir():
        if p.is_file():
            os.link(p, out / p.name)
    how = rnd.random()
    if how < 0.45:
        cfg = json.loads((seed / "config.json").read_text())
        for key in rnd.sample(config_keys, rnd.choice([1, 2])):
            value = rnd.choice(CONFIG_BAD)
            if isinstance(cfg.get(key), dict) and rnd.random() < 0.7:  # a nested object: one of its fields
                inner = rnd.choice(sorted(cfg[key]) + ["bits"])
                cfg[key] = {**cfg[key], inner: value}
            else:
                cfg[key] = value
        text = json.dumps(cfg)
        if rnd.random() < 0.1:
            text = rnd.choice(["[]", "{", "[" * 100000 + "]" * 100000, '{"num_hidden_layers": 2'])
        (out / "config.json").unlink()
        (out / "config.json").write_text(text)
        return
    weights = sorted(p.name for p in seed.glob("*.safetensors"))[0]
    raw = (seed / weights).read_bytes()
    (out / weights).unlink()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    if how < 0.85:
        name = rnd.choice([k for k in header if k != "__metadata__"])
        entry = dict(header[name])
        what = rnd.choice(["dtype", "shape", "data_offsets"])
        entry[what] = rnd.choice({
            "dtype": ["F33", "", None, 5, "I8", "F64", "BOOL"],
            "shape": [[], [-1, 4], [1 << 40, 1 << 40], "x", [2.5], [0], list(reversed(entry["shape"])),
                      [1] * 100],
            "data_offsets": [[0, 1 << 62], [-8, 0], [5, 3], [0, 0], "x", [0], [len(body), len(body) + 4]],
        }[what])
        header[name] = entry
        new = json.dumps(header).encode()
        raw = struct.pack("<Q", len(new)) + new + body
    elif how < 0.95:
        raw = rnd.choice([struct.pack("<Q", 1 << 62) + raw[8:], raw[:rnd.randint(0, len(raw) - 1)],
                          struct.pack("<Q", n) + b"\xff" * n + body])
    else:
        raw = bytearray(raw)
        for _ in range(rnd.randint(1, 8)):
            raw[rnd.randint(0, 8 + n - 1)] = rnd.randint(0, 255)
        raw = bytes(raw)
    (out / weights).write_bytes(raw)


ADAPTER_BAD = {
    "r": ["x", 0, -4, 2.5, None, 1 << 40, True, [4]],
    "lora_alpha": ["x", float("nan"), 1e308, float("inf"), -8, 0, None, [8], {"a": 1}],
    "rank_pattern": [[4], {"(": 4}, {"q_proj": "x"}, "q_proj", {"q_proj": 0}, {"a" * 2000: 4}],
    "alpha_pattern": [{"q_proj": float("inf")}, {"q_proj": float("nan")}, [1], {"[": 2}, {"q_proj": 1e308}],
    "target_modules": ["(", 5, [1, 2], {"a": 1}, "q_proj|(", None],
    "use_rslora": ["yes", 1, None],
    "peft_type": ["LOHA", 5, None],
    "bias": ["all", 5],
    "base_model_name_or_path": [5, ["x"]],
}


def mutate_adapter(seed: Path, out: Path, rnd: random.Random) -> Path:
    out.mkdir()
    cfg = json.loads((seed / "adapter_config.json").read_text())
    how = rnd.random()
    if how < 0.55:
        for key in rnd.sample(sorted(ADAPTER_BAD), rnd.choice([1, 2])):
            cfg[key] = rnd.choice(ADAPTER_BAD[key])
        text = json.dumps(cfg)
    elif how < 0.6:
        text = "[" * 200000 + "]" * 200000
    else:
        text = json.dumps(cfg)
    (out / "adapter_config.json").write_text(text)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(seed / "adapter_model.safetensors"))
    if how >= 0.6:
        name = rnd.choice(sorted(tensors))
        t = tensors[name]
        tensors[name] = rnd.choice([t * 1e30, t * float("nan"), t * float("inf"), t.t().contiguous(),
                                    t.to(torch.int32), t[:1].contiguous(), t.half() * 6e4, torch.zeros(0)])
    save_file(tensors, str(out / "adapter_model.safetensors"))
    if rnd.random() < 0.1:  # a path near the limits: long, but the directory is real
        deep = out
        for i in range(30):
            deep = deep / ("d" * 120)
        try:
            deep.mkdir(parents=True)
            for p in out.glob("adapter_*"):
                shutil.copy(p, deep / p.name)
            return deep
        except OSError:
            pass
    return out


# ---- the fuzz run ----------------------------------------------------------------------------

def _names_the_file(result: dict, path: Path) -> bool:
    parts = {path.name, path.parent.name, str(path)[:100]}
    return any(p and p in result["detail"] for p in parts)


def test_loader_fuzz(seeds, capsys):
    rnd = random.Random(int(os.environ.get("SARATHI_FUZZ_SEED", "25")))
    worker = seeds["worker"]
    root = seeds["root"] / "cases"
    root.mkdir()
    tally = {k: 0 for k in ("inputs", "ok", "clean errors", "unclear errors", "tracebacks", "crashes", "hangs")}
    findings: List[str] = []

    def record(kind: str, path: Path, result: dict, what: str) -> None:
        tally["inputs"] += 1
        outcome = result["outcome"]
        if os.environ.get("SARATHI_FUZZ_VERBOSE"):
            with capsys.disabled():
                print(f"{result['seconds']:6.2f}s {kind} {outcome}: {result['detail'][-160:]!r}")
        if outcome == "ok":
            tally["ok"] += 1
        elif outcome == "error" and result.get("one_line") and _names_the_file(result, path):
            tally["clean errors"] += 1
        elif outcome == "error":
            tally["unclear errors"] += 1
            findings.append(f"UNCLEAR ERROR {kind} ({what}): {result['detail'][:400]}")
        else:
            tally[{"traceback": "tracebacks", "crash": "crashes", "hang": "hangs"}[outcome]] += 1
            findings.append(f"{outcome.upper()} {kind} ({what}, {result['seconds']} s): {result['detail'][-1500:]}")

    # the seeds load
    for kind, path in (("gguf", seeds["gguf"]), ("safetensors", seeds["hf"]), ("gptq", seeds["gptq"]),
                       ("adapter", seeds["adapter"])):
        result = worker.run(kind, path)
        assert result["outcome"] == "ok", (kind, result)

    seed = seeds["gguf"].read_bytes()
    fields = gguf_numeric_fields(seeds["gguf"])
    for i in range(3 * EXAMPLES):
        path = root / f"m{i}.gguf"
        path.write_bytes(mutate_gguf(seed, fields, rnd))
        record("gguf", path, worker.run("gguf", path), f"mutant {i}")
        path.unlink()
    hf_keys = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim"]
    for i in range(EXAMPLES):
        out = root / f"hf{i}"
        mutate_hf_dir(seeds["hf"], out, rnd, hf_keys)
        record("safetensors", out, worker.run("safetensors", out), f"mutant {i}")
        shutil.rmtree(out)
    for i in range(EXAMPLES):
        out = root / f"gptq{i}"
        mutate_hf_dir(seeds["gptq"], out, rnd, ["quantization_config", "num_hidden_layers", "hidden_size"])
        record("gptq", out, worker.run("gptq", out), f"mutant {i}")
        shutil.rmtree(out)
    for i in range(2 * EXAMPLES):
        out = root / f"ad{i}"
        path = mutate_adapter(seeds["adapter"], out, rnd)
        record("adapter", path, worker.run("adapter", path), f"mutant {i}")
        shutil.rmtree(out)
    with capsys.disabled():
        print("\nloader fuzz: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    if findings:
        with capsys.disabled():
            print("\n\n".join(findings[:10]))
    assert not findings, "\n\n".join(findings[:8])


# ---- the probe's findings ----------------------------------------------------------------------

def _set_gguf_field(seed: Path, out: Path, name: str, value) -> Path:
    import gguf

    r = gguf.GGUFReader(str(seed))
    part = r.fields[name].parts[-1]
    data = bytearray(seed.read_bytes())
    off = part.ctypes.data - r.data.ctypes.data
    data[off:off + part.itemsize] = np.array([value], dtype=part.dtype).tobytes()
    out.write_bytes(bytes(data))
    return out


def test_gguf_block_count_2_31_is_refused_quickly(seeds, tmp_path):
    bad = _set_gguf_field(seeds["gguf"], tmp_path / "huge.gguf", "llama.block_count", (1 << 31) - 1)
    result = seeds["worker"].run("gguf", bad)
    assert result["outcome"] == "error" and result["seconds"] < 5, result
    assert "huge.gguf" in result["detail"] and "llama.block_count" in result["detail"], result


def test_gguf_header_fields_name_file_and_field(seeds, tmp_path):
    from sarathi.model_executor.gguf_check import check_gguf

    cases = {"llama.context_length": (0, "llama.context_length"),
             "llama.embedding_length": (0, "llama.embedding_length"),
             "llama.attention.head_count": (7, "llama.attention.head_count"),
             "llama.rope.freq_base": (float("nan"), "llama.rope.freq_base")}
    for field, (value, needle) in cases.items():
        with pytest.raises(ValueError, match=needle) as e:
            check_gguf(_set_gguf_field(seeds["gguf"], tmp_path / "f.gguf", field, value))
        assert "f.gguf" in str(e.value) and "\n" not in str(e.value)
    raw = seeds["gguf"].read_bytes()
    (tmp_path / "t.gguf").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="runs past the end of the data section"):
        check_gguf(tmp_path / "t.gguf")
    (tmp_path / "c.gguf").write_bytes(raw[:8] + struct.pack("<Q", 1 << 40) + raw[16:])
    with pytest.raises(ValueError, match="tensor_count"):
        check_gguf(tmp_path / "c.gguf")


def _write_adapter_with(seed: Path, out: Path, **changes) -> Path:
    shutil.copytree(seed, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("changes,needle", [
    ({"lora_alpha": "x"}, "lora_alpha must be a number"),
    ({"rank_pattern": [4]}, "rank_pattern must be an object"),
    ({"target_modules": "q_proj|("}, "target_modules"),
    ({"rank_pattern": {"(": 4}}, "not a valid regular expression"),
    ({"lora_alpha": float("nan")}, "lora_alpha nan"),
    ({"lora_alpha": 1e308}, r"lora_alpha 1e\+308 is not a finite number"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
])
def test_bad_adapter_configs_are_value_errors(seeds, tmp_path, changes, needle):
    from sarathi.lora.adapter import AdapterError, load_adapter


    path = _write_adapter_with(seeds["adapter"], tmp_path / "ad", **changes)
    with pytest.raises(AdapterError, match=needle) as e:
        load_adapter("x", path, 2, SHAPES, 16)
    assert "\n" not in str(e.value) and "ad" in str(e.value)


def test_deep_nesting_and_long_paths_are_value_errors(seeds, tmp_path):
    from sarathi.lora.adapter import AdapterError, load_adapter


    path = _write_adapter_with(seeds["adapter"], tmp_path / "deep")
    (path / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_adapter("x", path, 2, SHAPES, 16)
    with pytest.raises(AdapterError, match="longer than 4096") as e:
        load_adapter("x", "/tmp/" + "a" * 100000, 2, SHAPES, 16)
    assert len(str(e.value)) < 400
    with pytest.raises(AdapterError, match="File name too long|not a directory"):
        load_adapter("x", "/tmp/" + "a" * 300, 2, SHAPES, 16)


def test_weights_times_1e30_are_refused_after_scaling(seeds, tmp_path):
    """Finite weights whose update overflows once scaled (x1e30, or lora_alpha 1e6 on large B)."""
    from safetensors.torch import load_file, save_file

    from sarathi.lora.adapter import AdapterError, load_adapter

    path = _write_adapter_with(seeds["adapter"], tmp_path / "big")
    tensors = {k: v * 1e30 if "lora_B" in k else v for k, v in load_file(str(path / "adapter_model.safetensors"))
               .items()}
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="would change weights by up to"):
        load_adapter("x", path, 2, SHAPES, 16)
    ok = load_adapter("x", seeds["adapter"], 2, SHAPES, 16)
    assert all(math.isfinite(float(b.abs().max())) for _, b in ok.weights.values())


def test_gptq_v1_labelled_v2_is_refused(seeds, tmp_path, tiny_model_dir):
    from sarathi.model_executor.checkpoint_check import check_model_dir
    from sarathi.quantize.core import QuantizeOptions, quantize

    labelled = tmp_path / "labelled"
    shutil.copytree(seeds["gptq"], labelled)
    cfg = json.loads((labelled / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (labelled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="contradicts quantize_config.json"):
        check_model_dir(labelled, cfg)
    (labelled / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="sarathi-quantize writes GPTQ v1"):
        check_model_dir(labelled, cfg)
    # Another tool's symmetric v1 export relabelled: no metadata to go by, the zeros show it.
    sym = tmp_path / "sym"
    quantize(str(tiny_model_dir), sym, QuantizeOptions(method="rtn", group_size=32, sym=True, threads=1),
             progress=False)
    cfg = json.loads((sym / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    del cfg["quantization_config"]["meta"]
    (sym / "config.json").write_text(json.dumps(cfg))
    (sym / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="the checkpoint is GPTQ v1"):
        check_model_dir(sym, cfg)


def test_hf_config_num_hidden_layers_2_31_is_refused(seeds, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(seeds["hf"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = (1 << 31) - 1
    (out / "config.json").write_text(json.dumps(cfg))
    result = seeds["worker"].run("safetensors", out)
    assert result["outcome"] == "error" and "num_hidden_layers" in result["detail"] and result["seconds"] < 5
