"""Engine configuration: one dataclass, its CLI flags (vLLM spellings plus the
original integration's aliases) and YAML presets from configs/."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional

SCHEDULERS = ("sarathi", "vllm", "orca")
KV_BACKENDS = ("vattention", "paged", "contiguous")
# --model_attention_backend values of the original integration -> our KV backend.
ATTENTION_BACKEND_ALIASES = {
    "fa_vattn": "vattention", "fi_vattn": "vattention", "vattention": "vattention",
    "fa_paged": "paged", "fi_paged": "paged", "paged": "paged", "contiguous": "contiguous",
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_bytes(value: Any) -> int:
    """'2GiB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse a byte size from {value!r} (try e.g. 2GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    """Every engine setting; each is also a CLI flag (dashes) and an LLM(...) keyword."""

    model: str = "smollm2-135m-instruct"
    served_model_name: Optional[str] = None
    patch_tokenizer: Optional[str] = None
    dtype: str = "auto"              # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"             # auto: cuda if available, else cpu
    seed: int = 0
    max_model_len: Optional[int] = None   # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None  # vllm/orca token budget (default: max_model_len)
    scheduler: str = "sarathi"
    chunk_size: int = 512
    kv_cache_backend: str = "vattention"
    kv_cache_memory: Any = "2GiB"    # physical KV budget in bytes
    block_size: int = 16             # paged backend: tokens per block
    page_size: Optional[int] = None  # vattention backend: bytes per page
    tensor_parallel_size: int = 1
    num_threads: Optional[int] = None
    async_kv_mapping: bool = True    # vattention: map pages ahead on a background thread
    disable_log_stats: bool = True

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.kv_cache_backend = ATTENTION_BACKEND_ALIASES.get(self.kv_cache_backend, self.kv_cache_backend)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.kv_cache_backend not in KV_BACKENDS:
            raise ValueError(f"kv_cache_backend must be one of {KV_BACKENDS} "
                             f"(or fa_vattn/fa_paged), got {self.kv_cache_backend!r}")
        for name in ("max_num_seqs", "chunk_size", "block_size", "kv_cache_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet (scale-out is a later issue)")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "half", "float"):
            raise ValueError(f"dtype must be auto/float32/float16/bfloat16, got {self.dtype!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """LLM(...) keywords: flag names with underscores, aliases included."""
        known = {f.name for f in fields(cls)}
        values: Dict[str, Any] = {}
        for key, value in kwargs.items():
            key = _ALIASES.get(key, key)
            if key not in known:
                raise TypeError(f"unknown engine argument {key!r}")
            values[key] = value
        return cls(**values)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineConfig":
        """Flags given on the command line win over the --config preset, which wins over defaults."""
        known = {f.name for f in fields(cls)}
        values = load_preset(ns.config) if getattr(ns, "config", None) else {}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config preset {ns.config!r} has unknown keys: {sorted(unknown)}")
        values.update({k: v for k, v in vars(ns).items() if k in known and v is not None})
        return cls(**values)


# Spellings documented by the original integration (and vLLM's), as aliases.
_ALIASES = {
    "model_name": "model",
    "patch_tokenizer_path": "patch_tokenizer",
    "model_attention_backend": "kv_cache_backend",
    "model_block_size": "page_size",
    "model_tensor_parallel_degree": "tensor_parallel_size",
    "tensor_parallel_degree": "tensor_parallel_size",
    "kv_cache_bytes": "kv_cache_memory",
}


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every engine flag (and its aliases) to an argparse parser."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--config", type=str, default=None,
                   help="YAML preset (see configs/); flags on the command line win")
    g.add_argument("--model", "--model_name", dest="model", default=None,
                   help=f"alias, HF-style directory or .gguf file (default {d.model})")
    g.add_argument("--served-model-name", dest="served_model_name", default=None)
    g.add_argument("--patch-tokenizer", "--patch_tokenizer_path", dest="patch_tokenizer", default=None,
                   help="AdaptiVocab PatchTokenizer directory")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "half", "float"])
    g.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", dest="max_model_len", type=int, default=None)
    g.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=None,
                   help=f"most sequences running at once (default {d.max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=None)
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default sarathi")
    g.add_argument("--chunk-size", dest="chunk_size", type=int, default=None,
                   help=f"sarathi token budget per step (default {d.chunk_size})")
    g.add_argument("--kv-cache-backend", "--model_attention_backend", dest="kv_cache_backend",
                   choices=sorted(set(KV_BACKENDS) | set(ATTENTION_BACKEND_ALIASES)), default=None,
                   help="vattention (default) or paged; fa_vattn / fa_paged accepted")
    g.add_argument("--kv-cache-memory", dest="kv_cache_memory", default=None,
                   help="physical KV cache budget, e.g. 2GiB (default 2GiB)")
    g.add_argument("--block-size", dest="block_size", type=int, default=None,
                   help="paged backend: tokens per block (default 16)")
    g.add_argument("--page-size", "--model_block_size", dest="page_size", type=parse_bytes, default=None,
                   help="vattention backend: bytes per physical page")
    g.add_argument("--tensor-parallel-size", "--model_tensor_parallel_degree", dest="tensor_parallel_size",
                   type=int, default=None)
    g.add_argument("--num-threads", dest="num_threads", type=int, default=None,
                   help="torch CPU threads (default: all cores)")
    g.add_argument("--async-kv-mapping", dest="async_kv_mapping", action=argparse.BooleanOptionalAction,
                   default=None, help="vattention: map pages ahead on a background thread (default on)")
    return parser


def load_preset(path: str) -> Dict[str, Any]:
    """Read a YAML preset; keys may use dashes or underscores. Aliases are normalised."""
    import yaml

    p = Path(path)
    if not p.is_file():
        alt = Path(__file__).resolve().parent.parent / "configs" / path
        if alt.is_file():
            p = alt
        else:
            raise ValueError(f"config preset {path!r} not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config preset {path!r} must be a mapping of flag -> value")
    return {_ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in data.items()}
