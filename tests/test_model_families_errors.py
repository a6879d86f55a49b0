"""Bad input fails with one line naming the file and what is wrong: an unknown architecture,
a config missing a field the family needs, a tensor of the wrong shape, a GGUF tensor or
architecture we do not know."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sarathi.model_executor.model_loader import load_model
from test_model_families import family  # noqa: F401


def load(d):
    return load_model(d, json.loads((d / "config.json").read_text()), torch.float32, torch.device("cpu"))


def edited_copy(d, tmp_path, config=None, tensors=None):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(d, out)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config(json.loads((d / "config.json").read_text()))))
    if tensors is not None:
        w = load_file(str(d / "model.safetensors"))
        save_file(tensors(w), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_unknown_architecture_lists_the_supported(family, tmp_path):
    d, _ = family("qwen2")
    bad = edited_copy(d, tmp_path, config=lambda c: dict(c, architectures=["FalconForCausalLM"], model_type="falcon"))
    with pytest.raises(ValueError) as e:
        load(bad)
    text = one_line(e)
    assert str(bad / "config.json") in text and "'FalconForCausalLM'" in text
    for name in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                 "MistralForCausalLM", "LlamaForCausalLM"):
        assert name in text


def test_config_missing_a_required_field(family, tmp_path):
    d, _ = family("gemma2")
    bad = edited_copy(d, tmp_path, config=lambda c: {k: v for k, v in c.items() if k != "query_pre_attn_scalar"})
    with pytest.raises(ValueError) as e:
        load(bad)
    assert one_line(e) == (f"{bad / 'config.json'}: config.json has no 'query_pre_attn_scalar', "
                           "which Gemma2ForCausalLM needs")


def test_mismatched_tensor_names_file_and_tensor(family, tmp_path):
    d, _ = family("qwen3")
    name = "model.layers.1.self_attn.k_norm.weight"
    bad = edited_copy(d, tmp_path, tensors=lambda w: dict(w, **{name: torch.ones(16)}))
    with pytest.raises(ValueError) as e:
        load(bad)
    assert one_line(e) == f"{bad / 'model.safetensors'}: weight {name!r} has shape (16,), expected (32,)"
    name = "model.layers.0.mlp.down_proj.weight"
    bad = edited_copy(d, tmp_path / "2", tensors=lambda w: dict(w, **{name: w[name][:, :100].contiguous()}))
    with pytest.raises(ValueError) as e:
        load(bad)
    assert one_line(e) == f"{bad / 'model.safetensors'}: weight {name!r} has shape (64, 100), expected (64, 128)"


def test_gguf_unknown_architecture_and_tensor(tmp_path):
    import gguf

    from sarathi.model_executor.model_loader import convert_gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as e:
        convert_gguf(path)
    assert one_line(e).startswith(f"{path}: GGUF architecture 'falcon' is not supported; supported: llama, qwen2")

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("embedding_length", 4), ("block_count", 1), ("feed_forward_length", 8)):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.add_tensor("blk.0.ssm_conv1d.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as e:
        convert_gguf(path)
    assert one_line(e) == f"{path}: tensor 'blk.0.ssm_conv1d.weight' is not part of a qwen2 model"


def test_gguf_header_checks_cover_the_families(family, tmp_path, monkeypatch):
    """The GGUF checker reads `<arch>.*` for every family: a block count that disagrees with
    the tensors is refused before anything is converted, naming the file and the key."""
    import shutil

    from sarathi.model_executor.gguf_check import check_gguf
    from sarathi.model_executor.model_loader import _embedded_smollm2
    from test_model_families_gguf import write_gguf

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path / "cache"))
    d, _ = family("qwen3")
    good = write_gguf(d, tmp_path / "qwen3.gguf", _embedded_smollm2())
    assert check_gguf(good)["qwen3.attention.key_length"] == 32  # per-head q/k norms are key_length wide
    lying = tmp_path / "lying"
    shutil.copytree(d, lying)
    cfg = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    bad = write_gguf(lying, tmp_path / "qwen3-3-layers.gguf", _embedded_smollm2())
    with pytest.raises(ValueError) as e:
        check_gguf(bad)
    assert one_line(e).startswith(f"{bad}: GGUF qwen3.block_count: 3, but the tensors name 2 decoder layers")


def test_family_config_fields_are_checked(family, tmp_path):
    d, _ = family("gemma3")
    bad = edited_copy(d, tmp_path, config=lambda c: dict(c, layer_types=["sliding_attention"]))
    with pytest.raises(ValueError) as e:
        load(bad)
    assert "layer_types must list 'sliding_attention' or 'full_attention' for each of the 3 layers" in one_line(e)
    bad = edited_copy(d, tmp_path / "2", config=lambda c: dict(c, sliding_window=-4))
    with pytest.raises(ValueError) as e:
        load(bad)
    assert one_line(e) == f"{bad / 'config.json'}: sliding_window -4 is not in [1, 16777216]"
