"""Engine configuration in parts (model, cache, scheduler, parallel, LoRA, serving), the CLI flags
generated from their fields (vLLM spellings plus the original integration's aliases) and YAML
presets from configs/."""
from __future__ import annotations

import argparse
import importlib.util
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from sarathi.spec_decode.config import parse_speculative_config

SCHEDULERS = ("sarathi", "vllm", "orca")
EXECUTOR_BACKENDS = ("uni", "ray")
ROUTING_POLICIES = ("least-outstanding", "prefix-affinity")
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


def parse_lora_modules(value: Any) -> Dict[str, str]:
    """--lora-modules: 'name=path' strings (or vLLM's JSON form '{"name": ..., "path": ...}'), or a
    mapping already -> {name: path}."""
    if not value:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        for entry in ([value] if isinstance(value, str) else value):
            if isinstance(entry, dict) or str(entry).lstrip().startswith("{"):
                import json

                d = entry if isinstance(entry, dict) else json.loads(entry)
                if not isinstance(d, dict) or "name" not in d or "path" not in d:
                    raise ValueError(f"--lora-modules entry {entry!r} needs 'name' and 'path'")
                items.append((d["name"], d["path"]))
                continue
            name, sep, path = str(entry).partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules entry {entry!r} must look like name=path")
            items.append((name, path))
    out: Dict[str, str] = {}
    for name, path in items:
        if name in out:
            raise ValueError(f"--lora-modules names adapter {name!r} twice")
        out[str(name)] = str(path)
    return out


# --dtype names -> torch dtype names (auto: float32 on CPU, bfloat16 on CUDA).
DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
          "bfloat16": "bfloat16"}


def torch_dtype(name: str, device_type: str):
    """The torch dtype for a --dtype value on a device type ('cpu' / 'cuda')."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, DTYPES[name])


def flag(default: Any, help: str, *aliases: str, type: Optional[Callable] = None,
         choices: Optional[Sequence[str]] = None, nargs: Optional[str] = None) -> Any:
    """A config field that is also a CLI flag: --name-with-dashes plus aliases."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "type": type, "choices": choices,
                                            "nargs": nargs})


QUANTIZATIONS = ("auto", "none", "gguf", "gptq", "awq", "int8")


class _Part:
    """A group of engine settings. Each field with help is a CLI flag (dashes) and an LLM(...)
    keyword; `choices` are checked here, the rest by the part's `_check`."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        self._check()

    def _check(self) -> None:
        pass

    def _at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass
class ModelConfig(_Part):
    """Which model, in which format and dtype, on which device."""

    model: str = flag("smollm2-135m-instruct", "alias, HF-style directory or .gguf file", "--model_name")
    served_model_name: Optional[str] = flag(None, "name clients use (default: --model)")
    patch_tokenizer: Optional[str] = flag(None, "AdaptiVocab PatchTokenizer directory", "--patch_tokenizer_path")
    dtype: str = flag("auto", "weights and KV dtype; auto: float32 on CPU, bfloat16 on CUDA",
                      choices=("auto", *DTYPES))
    device: str = flag("auto", "auto, cpu or cuda[:N]")
    quantization: str = flag("auto", "weight format: auto = what the checkpoint is (GGUF blocks, GPTQ / AWQ "
                             "groups, else float); none = float (exact HF parity); int8 = per-channel int8 "
                             "at load", choices=QUANTIZATIONS)
    seed: int = flag(0, "seed of the engine's shared sampling generator")
    max_model_len: Optional[int] = flag(None, "context length (default: the model's max_position_embeddings)",
                                        type=int)

    def _check(self) -> None:
        self._at_least(1, "max_model_len")


@dataclass
class CacheConfig(_Part):
    """The KV cache: backend, budget, geometry, prefix caching."""

    kv_cache_backend: str = flag("vattention", "KV backend; fa_vattn / fa_paged accepted", "--model_attention_backend",
                                 choices=sorted(set(KV_BACKENDS) | set(ATTENTION_BACKEND_ALIASES)))
    kv_cache_memory: Any = flag("2GiB", "physical KV cache budget, e.g. 2GiB", "--kv_cache_bytes")
    block_size: int = flag(16, "paged backend: tokens per block")
    page_size: Optional[int] = flag(None, "vattention backend: bytes per physical page", "--model_block_size",
                                    type=parse_bytes)
    kv_cache_dtype: str = flag("auto", "KV cache element type: auto = the model's --dtype; float16 or bfloat16 "
                               "halve the KV memory and the bytes attention reads (vattention on CPU; keys and "
                               "values are rounded as stored and computed with in float32)",
                               choices=("auto", "float32", "float16", "bfloat16"))
    async_kv_mapping: bool = flag(True, "vattention: map pages ahead on a background thread")
    enable_prefix_caching: bool = flag(True, "reuse the KV of prompt prefixes other requests computed "
                                       "(vattention on CPU and paged backends)")

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        super().__post_init__()
        self.kv_cache_backend = ATTENTION_BACKEND_ALIASES[self.kv_cache_backend]

    def _check(self) -> None:
        self._at_least(1, "block_size", "kv_cache_memory")


@dataclass
class SchedulerConfig(_Part):
    """How steps are batched."""

    scheduler: str = flag("sarathi", "batch policy", choices=SCHEDULERS)
    max_num_seqs: int = flag(64, "most sequences running at once")
    chunk_size: int = flag(512, "sarathi token budget per step")
    max_num_batched_tokens: Optional[int] = flag(None, "vllm/orca token budget per step (default: max_model_len)",
                                                 type=int)
    max_prefills_per_step: Optional[int] = flag(None, "sarathi: most requests whose prompt chunks share one step "
                                                "(the samples of one request count once); 0 fills the token budget "
                                                "with as many as fit (default: 1 on CPU, where a step's time grows "
                                                "with its tokens; 0 on CUDA)", type=int)

    def _check(self) -> None:
        self._at_least(1, "max_num_seqs", "chunk_size")
        self._at_least(0, "max_prefills_per_step")


@dataclass
class ParallelConfig(_Part):
    """Threads, replicas and how requests reach them."""

    tensor_parallel_size: int = flag(1, "tensor parallel degree (only 1)", "--model_tensor_parallel_degree",
                                     "--tensor_parallel_degree")
    num_threads: Optional[int] = flag(None, "CPU threads of the native kernels and torch (default: all cores; with "
                                      "--data-parallel-size N, the cores divided by N), per replica; when every "
                                      "linear layer is quantized, torch's own ops get one", type=int)
    data_parallel_size: int = flag(1, "engine replicas behind one server (needs --distributed-executor-backend ray)")
    distributed_executor_backend: str = flag("uni", "uni: one engine in this process; ray: replicas as Ray actors",
                                             choices=EXECUTOR_BACKENDS)
    ray_address: Optional[str] = flag(None, "Ray cluster to join ('auto', 'HOST:PORT' or 'ray://HOST:PORT'); "
                                      "default: start a local Ray instance on 127.0.0.1")
    routing: str = flag("least-outstanding", "which replica gets a request; prefix-affinity sends prompts whose "
                        "first blocks hash the same to the same replica", choices=ROUTING_POLICIES)
    routing_max_imbalance: int = flag(8, "prefix-affinity: leave the affine replica for the least loaded one "
                                      "when it has this many more requests in flight")
    ray_max_restarts: int = flag(3, "times Ray restarts a replica that died (-1: forever)")

    def _check(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet (scale-out is a later issue)")
        self._at_least(1, "data_parallel_size", "num_threads")
        self._at_least(0, "routing_max_imbalance")
        if self.ray_max_restarts < -1:
            raise ValueError(f"ray_max_restarts must be >= -1 (-1: forever), got {self.ray_max_restarts}")
        if self.data_parallel_size > 1 and self.distributed_executor_backend != "ray":
            raise ValueError("--data-parallel-size > 1 needs --distributed-executor-backend ray")
        if self.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("--distributed-executor-backend ray needs Ray: pip install -e '.[ray]' "
                             "(or pip install ray)")


@dataclass
class LoRAConfig(_Part):
    """Adapters served on top of the base model."""

    enable_lora: bool = flag(False, "serve LoRA adapters on top of the base model (unmerged, batched together)")
    lora_modules: Optional[Any] = flag(None, "adapters to serve: name=path (PEFT directories)", nargs="+")
    max_loras: int = flag(4, "most distinct adapters in one step (more in flight wait in the queue)")
    max_lora_rank: int = flag(16, "largest adapter rank accepted")
    max_cpu_loras: Optional[int] = flag(None, "adapters kept loaded in host memory (default: max(max_loras, "
                                        "number of --lora-modules))", type=int)

    def _check(self) -> None:
        self.lora_modules = parse_lora_modules(self.lora_modules)
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        self._at_least(1, "max_loras", "max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass
class ServingConfig(_Part):
    """What one request may ask for, and the second models requests can name."""

    max_logprobs: int = flag(20, "most logprobs / top_logprobs / prompt_logprobs a request may ask for")
    max_n: int = flag(16, "most samples (n) one request may ask for")
    optimal_sampling_target: Optional[str] = flag(None, "a second model (same tokenizer) that requests can name as "
                                                  "optimal_sampling's target pi_t")
    optimal_sampling_target_name: Optional[str] = flag(None, "the name requests use for it (default: "
                                                       "--optimal-sampling-target as given)")
    disable_log_stats: bool = True

    def _check(self) -> None:
        self._at_least(1, "max_n")
        self._at_least(0, "max_logprobs")


@dataclass
class StructuredOutputsConfig(_Part):
    """Output constrained to a JSON schema, regex, choice or grammar (response_format, structured_outputs)."""

    structured_outputs_backend: str = flag("auto", "grammar library (auto: xgrammar)", choices=("auto", "xgrammar"))
    structured_outputs_compile_timeout: float = flag(10.0, "seconds a constraint may take to compile; the request "
                                                     "gets a 400 after that", type=float)
    structured_outputs_max_bytes: int = flag(65536, "largest schema / regex / grammar a request may send, in bytes",
                                             type=int)

    def _check(self) -> None:
        if not self.structured_outputs_compile_timeout > 0:
            raise ValueError(f"structured_outputs_compile_timeout must be > 0, got "
                             f"{self.structured_outputs_compile_timeout!r}")
        self._at_least(1, "structured_outputs_max_bytes")


@dataclass
class SpeculativeDecodingConfig(_Part):
    """Speculative decoding (docs/speculative-decoding.md)."""

    speculative_config: Optional[Any] = flag(
        None, "speculative decoding as JSON, vLLM's keys: {\"method\": \"ngram\" | \"early_exit\" | "
        "\"draft_model\", \"num_speculative_tokens\": k, \"prompt_lookup_min\", \"prompt_lookup_max\", "
        "\"model\", \"disable_by_batch_size\", \"num_early_exit_layers\"}")

    def _check(self) -> None:
        self.speculative_config = parse_speculative_config(self.speculative_config)


# EngineConfig's attribute -> part class, in --help order.
PARTS: Dict[str, type] = {"model_config": ModelConfig, "cache_config": CacheConfig,
                          "scheduler_config": SchedulerConfig, "parallel_config": ParallelConfig,
                          "lora_config": LoRAConfig, "serving_config": ServingConfig,
                          "structured_outputs_config": StructuredOutputsConfig,
                          "speculative_decoding_config": SpeculativeDecodingConfig}
# Setting name -> the part that holds it.
_OWNER: Dict[str, str] = {f.name: attr for attr, cls in PARTS.items() for f in fields(cls)}
# Spellings documented by the original integration (and vLLM's), as LLM(...) keywords and preset keys.
_ALIASES = {alias.lstrip("-"): f.name for cls in PARTS.values() for f in fields(cls)
            for alias in f.metadata.get("aliases", ())}


class EngineConfig:
    """Every engine setting, in parts (vLLM's VllmConfig pattern): `model_config`, `cache_config`,
    `scheduler_config`, `parallel_config`, `lora_config`, `serving_config`,
    `structured_outputs_config`, `speculative_decoding_config`. Built from flat keywords (the CLI flags with underscores,
    aliases included), which each land in their part."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    lora_config: LoRAConfig
    serving_config: ServingConfig
    structured_outputs_config: StructuredOutputsConfig
    speculative_decoding_config: SpeculativeDecodingConfig

    def __init__(self, **settings: Any) -> None:
        grouped: Dict[str, Dict[str, Any]] = {attr: {} for attr in PARTS}
        for key, value in settings.items():
            key = _ALIASES.get(key, key)
            if key not in _OWNER:
                raise TypeError(f"unknown engine argument {key!r}")
            grouped[_OWNER[key]][key] = value
        for attr, cls in PARTS.items():
            setattr(self, attr, cls(**grouped[attr]))

    @classmethod
    def from_kwargs(cls, **settings: Any) -> "EngineConfig":
        """LLM(...) keywords: flag names with underscores, aliases included."""
        return cls(**settings)

    def settings(self) -> Dict[str, Any]:
        """Every setting by its flat name (what __init__ takes)."""
        return {f.name: getattr(part, f.name) for part in self.parts() for f in fields(part)}

    def replace(self, **changes: Any) -> "EngineConfig":
        """A copy with some settings changed (flat names)."""
        return EngineConfig(**{**self.settings(), **changes})

    def parts(self) -> list:
        return [getattr(self, attr) for attr in PARTS]

    def __repr__(self) -> str:
        return f"EngineConfig({', '.join(map(repr, self.parts()))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineConfig) and self.parts() == other.parts()

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineConfig":
        """Flags given on the command line win over the --config preset, which wins over defaults."""
        values = load_preset(ns.config) if getattr(ns, "config", None) else {}
        unknown = set(values) - set(_OWNER)
        if unknown:
            raise ValueError(f"config preset {ns.config!r} has unknown keys: {sorted(unknown)}")
        values.update({k: v for k, v in vars(ns).items() if k in _OWNER and v is not None})
        return cls(**values)


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every engine flag (and its aliases) to an argparse parser, from the parts' fields.

    Flags default to None so that a --config preset fills what the command line leaves out."""
    parser.add_argument_group("engine").add_argument(
        "--config", type=str, default=None, help="YAML preset (see configs/); flags on the command line win")
    for cls in PARTS.values():
        g = parser.add_argument_group(cls.__name__, cls.__doc__)
        for f in fields(cls):
            meta = f.metadata
            if "help" not in meta:
                continue
            names = ["--" + f.name.replace("_", "-"), *meta["aliases"]]
            help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {f.default})"
            if isinstance(f.default, bool):
                g.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
                continue
            kind = meta["type"] or (type(f.default) if isinstance(f.default, (int, float)) else str)
            g.add_argument(*names, dest=f.name, type=kind, choices=meta["choices"], nargs=meta["nargs"],
                           default=None, help=help_text)
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
