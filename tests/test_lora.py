"""LoRA adapters served unmerged: equal to peft, batched with each other and the base,
capped by --max-loras without failing anything, and every bad adapter refused clearly."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from conftest import hf_greedy
from lora_testutil import make_adapter, peft_model
from sarathi import LLM, LoRARequest, SamplingParams

PROMPTS = [[1, 200, 300, 400, 500, 600], [1, 9000, 17, 4242, 31337, 12, 77, 5]]
MAX_NEW = 8


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": make_adapter(tiny_model_dir, root / "a1", seed=1),
        "a2": make_adapter(tiny_model_dir, root / "a2", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"]),
        "a3": make_adapter(tiny_model_dir, root / "a3", seed=3, r=16, alpha=16, use_rslora=True,
                           targets=["o_proj", "down_proj", "up_proj"]),
    }


@pytest.fixture(scope="module")
def llm(tiny_model_dir, adapters):
    return LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, max_loras=4,
               lora_modules=[f"{k}={v}" for k, v in adapters.items()], max_num_seqs=16)


def greedy(max_tokens=MAX_NEW):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)


def run_alone(llm, ids, lora):
    out = llm.generate(prompt_token_ids=[ids], sampling_params=greedy(), lora_request=lora)[0].outputs[0]
    return out.token_ids, [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


@pytest.mark.parametrize("name", ["a1", "a2", "a3"])
def test_unmerged_adapter_equals_peft(llm, tiny_model_dir, adapters, name):
    ref_model = peft_model(tiny_model_dir, adapters[name])
    for ids in PROMPTS:
        want_tokens, want_lps = hf_greedy(ref_model, ids, MAX_NEW)
        tokens, lps = run_alone(llm, ids, LoRARequest(name))
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) <= 1e-4


def test_adapter_changes_the_output(llm):
    base, _ = run_alone(llm, PROMPTS[0], None)
    assert base != run_alone(llm, PROMPTS[0], LoRARequest("a1"))[0]


def test_adapters_never_share_cached_prefixes(llm):
    """The adapter is part of every prefix-cache block identity: same tokens, other adapter, no hit."""
    ids = list(range(1000, 1400))
    cached = {}
    for name in (None, "a1", "a2", "a1", None):
        out = llm.generate(prompt_token_ids=[ids], sampling_params=greedy(),
                           lora_request=LoRARequest(name) if name else None)[0]
        cached.setdefault(name, []).append(out.num_cached_tokens)
    assert cached == {None: [0, 399], "a1": [0, 399], "a2": [0]}
    # Unloading an adapter forgets what its weights computed: the same name loaded again starts cold.
    path = llm.engine.plugins.lora.paths["a2"]
    llm.engine.plugins.lora.remove("a2", users=0)
    llm.engine.plugins.lora.add(LoRARequest("a2", 2, path))
    out = llm.generate(prompt_token_ids=[ids], sampling_params=greedy(), lora_request=LoRARequest("a2"))[0]
    assert out.num_cached_tokens == 0


def test_mixed_batch_equals_each_alone(llm):
    """One step holds rows of the base and three adapters; each equals its request run alone."""
    loras = [None, LoRARequest("a1"), LoRARequest("a2"), LoRARequest("a3")]
    jobs = [(ids, lora) for ids in PROMPTS for lora in loras]
    alone = [run_alone(llm, ids, lora) for ids, lora in jobs]
    outs = llm.generate(prompt_token_ids=[ids for ids, _ in jobs], sampling_params=greedy(),
                        lora_request=[lora for _, lora in jobs])
    for out, (want_tokens, want_lps) in zip(outs, alone):
        o = out.outputs[0]
        assert o.token_ids == want_tokens
        lps = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) <= 1e-5


def test_more_adapters_than_max_loras_queue(tiny_model_dir, adapters):
    """max_loras=1: requests of three adapters all finish, never two adapters in one step."""
    llm = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, max_loras=1,
              lora_modules=[f"{k}={v}" for k, v in adapters.items()])
    engine = llm.engine
    loras = [LoRARequest("a1"), LoRARequest("a2"), None, LoRARequest("a3"), LoRARequest("a1")]
    alone = [run_alone(llm, PROMPTS[0], lora)[0] for lora in loras]
    for i, lora in enumerate(loras):
        engine.add_request(f"r{i}", None, greedy(), prompt_token_ids=PROMPTS[0], lora_request=lora)
    done = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.error is None
                done[out.request_id] = out.outputs[0].token_ids
        running = {s.lora_name for s in engine.scheduler.running if s.lora_name}
        assert len(running) <= 1
    assert [done[f"r{i}"] for i in range(len(loras))] == alone


def test_lora_on_a_quantized_linear():
    """The delta sits on top of any weight format: a quantized Linear plus adapter rows."""
    from sarathi.lora.layers import LoRABatch, LoRAStack, lora_reference
    from sarathi.model_executor.layers.linear import Linear
    from sarathi.model_executor.quantization.formats import quantize_int8

    torch.manual_seed(0)
    lin = Linear(64, 96)
    w = torch.randn(96, 64)
    lin.quantize([quantize_int8(w)])
    batch = LoRABatch(3)
    lin.lora = LoRAStack(64, [("q_proj", 0, 64), ("k_proj", 64, 32)], 3, 8, batch, torch.device("cpu"))
    for slot in range(3):
        lin.lora.set_slot(slot, {"q_proj": (torch.randn(8, 64), torch.randn(64, 8)),
                                 "k_proj": (torch.randn(4, 64), torch.randn(32, 4))})
    x = torch.randn(7, 64)
    rows = [2, -1, 0, 0, 2, -1, 1]
    base = lin.qweight(x, None)
    batch.set_rows(torch.tensor(rows))
    y = lin(x)
    torch.testing.assert_close(y, base + lora_reference(x, rows, lin.lora), rtol=1e-4, atol=1e-4)
    lin.lora.native = False  # torch's grouped matmuls (SGMV) agree
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
    lin.lora.grouped = False  # and the gather (BGMV) path
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
    batch.set_rows(torch.full((7,), -1))
    torch.testing.assert_close(lin(x), base)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sgmv_matches_row_by_row(isa, threads):
    """The native kernel: odd sizes (column tails under 8, rank 5, parts of 11 and 5 columns),
    adapters of lower rank than the stack's (and of none), rows strided in a wider buffer, base
    rows untouched, every ISA and thread count."""
    from sarathi.lora.layers import LoRABatch, LoRAStack, lora_reference
    from sarathi.lora.kernels import lora_sgmv
    from sarathi.model_executor.quantization.kernels import available_isas

    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(1)
    for in_f, parts, slots, rank, rows in [(13, [("a", 0, 11), ("b", 11, 5)], 3, 5, 9),
                                           (64, [("q", 0, 64), ("k", 64, 32), ("v", 96, 32)], 4, 8, 37)]:
        batch = LoRABatch(slots)
        stack = LoRAStack(in_f, parts, slots, rank, batch, torch.device("cpu"))
        for s in range(slots):  # ranks below the stack's (slot 1 has none: an adapter without this layer)
            r = 0 if s == 1 else max(1, rank - 2 * s)
            stack.set_slot(s, {n: (torch.randn(r, in_f), torch.randn(w, r)) for n, _, w in parts} if r else {})
        assert stack.slot_ranks.tolist()[:2] == [rank, 0]
        row_slots = torch.randint(-1, slots, (rows,))
        row_slots[0] = -1
        batch.set_rows(row_slots)
        x = torch.randn(rows, in_f + 7)[:, 3:3 + in_f]  # row stride > in_features
        y0 = torch.randn(rows, sum(w for *_, w in parts))
        want = y0 + lora_reference(x, row_slots.tolist(), stack)
        for ranks in (stack.slot_ranks, None):  # skipping the zero columns, or multiplying them
            got = lora_sgmv(x, stack.A, stack.B, batch.perm, batch.segs, stack.part_cols, rank, y0.clone(),
                            slot_ranks=ranks, num_threads=threads, isa=isa)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert torch.equal(got[0], y0[0])


def test_native_sgmv_refuses_bad_indices():
    from sarathi.lora.kernels import lora_sgmv

    A, B = torch.zeros(2, 8, 4), torch.zeros(2, 4, 6)
    x, y = torch.zeros(3, 8), torch.zeros(3, 6)
    parts = torch.tensor([[0, 6]])
    ok = dict(rows=torch.tensor([0, 2]), segs=torch.tensor([[1, 0, 2]]), parts=parts)
    lora_sgmv(x, A, B, rank=4, y=y, **ok)
    for bad, msg in [(dict(ok, rows=torch.tensor([0, 3])), "row index"),
                     (dict(ok, segs=torch.tensor([[2, 0, 2]])), "segment"),
                     (dict(ok, segs=torch.tensor([[0, 1, 5]])), "segment"),
                     (dict(ok, parts=torch.tensor([[2, 6]])), "part"),
                     (dict(ok, rows=torch.tensor([0, 2], dtype=torch.int32)), "int64"),
                     (dict(ok, slot_ranks=torch.tensor([4, 5])), "rank outside"),
                     (dict(ok, slot_ranks=torch.tensor([4])), "one rank per slot")]:
        with pytest.raises(ValueError, match=msg):
            lora_sgmv(x, A, B, rank=4, y=y, **bad)
    with pytest.raises(ValueError, match="float32"):
        lora_sgmv(x.double(), A, B, rank=4, y=y, **ok)


def test_adapter_on_quantized_engine(tiny_model_dir, adapters):
    """int8 base + adapter: the adapter's delta is applied (outputs differ from the int8 base) and
    stay close to the float base + adapter."""
    llm = LLM(model=str(tiny_model_dir), quantization="int8", enable_lora=True,
              lora_modules=[f"a1={adapters['a1']}"])
    assert llm.engine.runner.quantization == "int8"
    float_llm = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True,
                    lora_modules=[f"a1={adapters['a1']}"])
    ids = PROMPTS[0]
    p = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    q = llm.generate(prompt_token_ids=[ids], sampling_params=p, lora_request=LoRARequest("a1"))[0].outputs[0]
    f = float_llm.generate(prompt_token_ids=[ids], sampling_params=p, lora_request=LoRARequest("a1"))[0].outputs[0]
    qb = llm.generate(prompt_token_ids=[ids], sampling_params=p)[0].outputs[0]
    assert q.token_ids == f.token_ids
    assert q.logprobs[0].keys() != qb.logprobs[0].keys() or q.token_ids != qb.token_ids


def test_runtime_load_and_unload(tiny_model_dir, adapters, tmp_path):
    llm = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, max_loras=1, max_cpu_loras=1)
    want = run_alone(LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True,
                         lora_modules=[f"a2={adapters['a2']}"]), PROMPTS[1], LoRARequest("a2"))
    # offline: a LoRARequest with a path loads the adapter on first sight (vLLM's behaviour)
    assert run_alone(llm, PROMPTS[1], LoRARequest("a2", 2, str(adapters["a2"]))) == want
    assert llm.engine.plugins.lora.names() == ["a2"]
    llm.engine.plugins.lora.add(LoRARequest("a1", 1, str(adapters["a1"])))  # evicts a2 from host memory (max_cpu_loras=1)
    assert run_alone(llm, PROMPTS[1], LoRARequest("a2")) == want    # read again from disk
    llm.engine.plugins.lora.remove("a2", users=0)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'a2'"):
        run_alone(llm, PROMPTS[1], LoRARequest("a2"))
    with pytest.raises(KeyError):
        llm.engine.plugins.lora.remove("a2", users=0)


# ---- bad input -------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _engine_error(tiny_model_dir, path, **kw):
    from sarathi.lora.adapter import AdapterError

    llm = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, **kw)
    with pytest.raises(AdapterError) as e:
        llm.engine.plugins.lora.add(LoRARequest("bad", 0, str(path)))
    # nothing else is affected: the engine still serves the base model and knows no adapter
    assert llm.engine.plugins.lora.names() == []
    assert len(run_alone(llm, PROMPTS[0], None)[0]) == MAX_NEW
    return str(e.value)


class _Boom:
    """Unpickling this would create a marker file: proves the .bin is never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_adapter_is_refused_unread(tiny_model_dir, adapters, tmp_path):
    bad = _copy(adapters["a1"], tmp_path / "bin")
    (bad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (bad / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    msg = _engine_error(tiny_model_dir, bad)
    assert "pickle" in msg and "never" in msg
    assert not marker.exists()


def test_missing_files_are_refused(tiny_model_dir, adapters, tmp_path):
    assert "not a directory" in _engine_error(tiny_model_dir, tmp_path / "nope")
    no_cfg = _copy(adapters["a1"], tmp_path / "nocfg")
    (no_cfg / "adapter_config.json").unlink()
    assert "adapter_config.json" in _engine_error(tiny_model_dir, no_cfg)
    no_w = _copy(adapters["a1"], tmp_path / "now")
    (no_w / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in _engine_error(tiny_model_dir, no_w)
    corrupt = _copy(adapters["a1"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    assert "cannot read" in _engine_error(tiny_model_dir, corrupt)


def test_rank_above_max_is_refused(tiny_model_dir, adapters):
    msg = _engine_error(tiny_model_dir, adapters["a3"], max_lora_rank=8)
    assert "rank 16" in msg and "--max-lora-rank 8" in msg


def _write_adapter(path, tensors, **config):
    """A hand-made adapter directory: adapter_config.json + these tensors."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_targets_the_model_lacks_are_refused(tiny_model_dir, tmp_path):
    q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    lm_head = _write_adapter(tmp_path / "lmhead", {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                                   "base_model.model.lm_head.lora_B.weight": torch.zeros(49152, 4)},
                             target_modules=["lm_head"])
    assert "unsupported target" in _engine_error(tiny_model_dir, lm_head)
    deep = _write_adapter(tmp_path / "deep", {q.format(5, "A"): torch.zeros(4, 64), q.format(5, "B"): torch.zeros(64, 4)})
    assert "layer 5" in _engine_error(tiny_model_dir, deep)
    shapes = _write_adapter(tmp_path / "shape", {q.format(0, "A"): torch.zeros(4, 32), q.format(0, "B"): torch.zeros(64, 4)})
    assert "A [r, 64]" in _engine_error(tiny_model_dir, shapes)


def test_unknown_adapter_and_lora_disabled(llm, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(), lora_request=LoRARequest("nope"))
    plain = LLM(model=str(tiny_model_dir), quantization="none")
    with pytest.raises(ValueError, match="--enable-lora"):
        plain.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(), lora_request=LoRARequest("a1"))
    with pytest.raises(ValueError, match="needs --enable-lora"):
        LLM(model=str(tiny_model_dir), lora_modules=["a=/x"])
    with pytest.raises(ValueError, match="name=path"):
        LLM(model=str(tiny_model_dir), enable_lora=True, lora_modules=["justapath"])


def test_generate_cli_with_an_adapter(llm, tiny_model_dir, adapters, capsys):
    from sarathi.__main__ import generate_main

    rc = generate_main(["--model", str(tiny_model_dir), "--quantization", "none", "--enable-lora", "--lora-modules",
                        f"a1={adapters['a1']}", "--lora", "a1", "--prompt", "Hello there", "--max-tokens", "6",
                        "--temperature", "0", "--ignore-eos", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    want = llm.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                        lora_request=LoRARequest("a1"))[0].outputs[0].token_ids
    assert got == want
