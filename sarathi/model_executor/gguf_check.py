"""GGUF headers read as a parser would: every field bounded before anything is allocated.

`check_gguf(path)` walks the header (magic, version, counts, key/value pairs, tensor infos)
with reads whose sizes are checked against the bytes left in the file and against sane maxima,
then cross-checks what the loader relies on: the hyperparameters of every supported architecture
(`<arch>.block_count`, ...) are integers in range,
`block_count` matches the decoder layers the tensors name, tensor types are known, and each
tensor's bytes (its type's block size times its shape) lie inside the data section, aligned and
without overlap, and float tensors (F32 / F16 / BF16) hold no NaN or inf. A malformed file fails
in milliseconds with one ValueError line naming the file and the field, before the `gguf` package
maps it or the converter allocates a layer.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path
from typing import Dict, List, Tuple, Union

MAGIC = b"GGUF"
MAX_KV = 1 << 16                 # metadata pairs
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24       # one string value (a chat template is a few KB)
MAX_ARRAY_DEPTH = 2
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40           # per tensor
# What the loader reads under `<arch>.` for every supported architecture, with the range it
# accepts; the optional ones may be absent.
HPARAM_LIMITS = {
    "block_count": (1, 1024),
    "embedding_length": (1, 1 << 17),
    "feed_forward_length": (1, 1 << 20),
    "attention.head_count": (1, 1024),
    "attention.head_count_kv": (1, 1024),
    "context_length": (1, 1 << 24),
    "attention.key_length": (1, 1 << 12),
    "attention.sliding_window": (0, 1 << 24),
    "rope.dimension_count": (1, 1 << 12),
}
OPTIONAL = {"attention.head_count_kv", "context_length", "attention.key_length", "attention.sliding_window",
            "rope.dimension_count"}
LLAMA_LIMITS = {f"llama.{k}": v for k, v in HPARAM_LIMITS.items()}  # the llama names, as before

# GGUF value types: id -> (name, struct format or None for string / array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = (0, 1, 30)   # ggml F32, F16, BF16
_BLK = re.compile(r"^blk\.([^.]*)\.")


class _Reader:
    """Reads from a read-only memory map; every read is checked against the bytes left."""

    def __init__(self, buf, size: int, where: str):
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.where}: GGUF {field}: {problem}")

    def read(self, n: int, field: str) -> bytes:
        if n < 0 or n > self.left:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos}, the file has {self.left} left")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def skip(self, n: int, field: str) -> None:
        if n < 0 or n > self.left:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos}, the file has {self.left} left")
        self.pos += n

    def scalar(self, fmt: str, field: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), field))[0]

    def string(self, field: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.scalar("<Q", f"{field} (string length)")
        if n > limit:
            raise self.fail(field, f"string length {n} exceeds the limit {limit}")
        try:
            return self.read(n, field).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(field, "string is not valid UTF-8") from None

    def value(self, vtype: int, field: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], field)
        if vtype == _STRING:
            return self.string(field)
        if vtype != _ARRAY:
            raise self.fail(field, f"unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(field, f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item = self.scalar("<I", f"{field} (array item type)")
        count = self.scalar("<Q", f"{field} (array length)")
        smallest = struct.calcsize(_SCALARS[item]) if item in _SCALARS else (8 if item in (_STRING, _ARRAY) else 0)
        if item not in _SCALARS and item not in (_STRING, _ARRAY):
            raise self.fail(field, f"unknown array item type {item}")
        if count * smallest > self.left:
            raise self.fail(field, f"array length {count} needs at least {count * smallest} bytes, "
                                   f"the file has {self.left} left")
        if item in _SCALARS:  # skipped, not decoded: token scores and types are large and unused here
            self.skip(count * smallest, field)
            return _Array(item, count)
        if item == _STRING:  # bounded, not decoded (the tokenizer's own reader decodes them)
            for i in range(count):
                n = self.scalar("<Q", f"{field}[{i}] (string length)")
                if n > MAX_STRING_BYTES:
                    raise self.fail(f"{field}[{i}]", f"string length {n} exceeds the limit {MAX_STRING_BYTES}")
                self.skip(n, f"{field}[{i}]")
            return _Array(item, count)
        for i in range(count):
            self.value(item, f"{field}[{i}]", depth + 1)
        return _Array(item, count)


class _Array:
    def __init__(self, item: int, count: int):
        self.item, self.count = item, count


def _type_sizes() -> Dict[int, Tuple[int, int]]:
    """ggml type id -> (elements per block, bytes per block), from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}


def check_gguf(path: Union[str, Path]) -> Dict[str, object]:
    """Validate the GGUF file at `path`; return its scalar metadata. Raises ValueError (one line)."""
    path = Path(path)
    where = str(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"{where}: cannot read the GGUF file ({e.strerror or e})") from None
    with f:
        if size < 24 or f.read(4) != MAGIC:
            raise ValueError(f"{where}: GGUF magic: not a GGUF file (no 'GGUF' magic or shorter than its 24-byte "
                             "header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _check(_Reader(buf, size, where), size)


def _check(r: _Reader, size: int) -> Dict[str, object]:
    r.pos = 4
    version = r.scalar("<I", "version")
    if version not in (2, 3):
        raise r.fail("version", f"{version} is not supported (2 and 3 are)")
    n_tensors = r.scalar("<Q", "tensor_count")
    n_kv = r.scalar("<Q", "metadata_kv_count")
    if n_tensors > MAX_TENSORS:
        raise r.fail("tensor_count", f"{n_tensors} exceeds the limit {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise r.fail("metadata_kv_count", f"{n_kv} exceeds the limit {MAX_KV}")
    meta: Dict[str, object] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", MAX_KEY_BYTES)
        shown = key[:200]
        if key in meta:
            raise r.fail(shown, "appears twice")
        vtype = r.scalar("<I", f"{shown} (value type)")
        meta[key] = r.value(vtype, shown)
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise r.fail("general.alignment", f"{alignment!r} is not a power of two up to 65536")
    types = _type_sizes()
    tensors: List[Tuple[str, int, int]] = []
    shapes: Dict[str, List[int]] = {}
    float_tensors: List[Tuple[str, int, int, int]] = []
    blocks = set()
    for i in range(n_tensors):
        name = r.string(f"tensor #{i} name", MAX_KEY_BYTES)
        if name in shapes:
            raise r.fail(f"tensor {name[:200]}", "appears twice")
        n_dims = r.scalar("<I", f"tensor {name[:200]} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name[:200]} n_dims", f"{n_dims} is not in [1, {MAX_DIMS}]")
        dims = [r.scalar("<Q", f"tensor {name[:200]} dims") for _ in range(n_dims)]
        ttype = r.scalar("<I", f"tensor {name[:200]} type")
        offset = r.scalar("<Q", f"tensor {name[:200]} offset")
        if ttype not in types:
            raise r.fail(f"tensor {name[:200]} type", f"{ttype} is not a known ggml type")
        elements = 1
        for d in dims:
            if d < 1:
                raise r.fail(f"tensor {name[:200]} dims", f"{dims} has an empty dimension")
            elements *= d
            if elements > MAX_ELEMENTS:
                raise r.fail(f"tensor {name[:200]} dims", f"{dims} exceeds {MAX_ELEMENTS} elements")
        block, block_bytes = types[ttype]
        if dims[0] % block:
            raise r.fail(f"tensor {name[:200]} dims", f"first dimension {dims[0]} is not a multiple of the "
                                                f"type's block of {block}")
        if offset % alignment:
            raise r.fail(f"tensor {name[:200]} offset", f"{offset} is not aligned to {alignment}")
        tensors.append((name, offset, elements // block * block_bytes))
        shapes[name] = dims
        if ttype in _FLOAT_TYPES:
            float_tensors.append((name, offset, elements // block * block_bytes, ttype))
        m = _BLK.match(name)
        if m:
            if not (m.group(1).isdigit() and m.group(1).isascii() and len(m.group(1)) <= 6):
                raise r.fail(f"tensor {name[:80]}", "the layer index is not a number below 10^6")
            blocks.add(int(m.group(1)))
    data_start = -(-r.pos // alignment) * alignment
    data_size = size - data_start
    end_prev, prev = 0, None
    for name, offset, nbytes in sorted(tensors, key=lambda t: t[1]):
        if offset < end_prev:
            raise r.fail(f"tensor {name[:200]} offset", f"{offset} overlaps tensor {str(prev)[:200]}")
        if offset + nbytes > data_size:
            raise r.fail(f"tensor {name[:200]} offset", f"{offset} + {nbytes} bytes runs past the end of the data "
                                                  f"section ({data_size} bytes)")
        end_prev, prev = offset + nbytes, name
    _check_hparams(r, meta, blocks, shapes)
    for name, offset, nbytes, ttype in float_tensors:
        _check_finite(r, name, data_start + offset, nbytes, ttype)
    return {k: v for k, v in meta.items() if not isinstance(v, _Array)}


def _check_finite(r: _Reader, name: str, start: int, nbytes: int, ttype: int) -> None:
    """Float tensors (F32 / F16 / BF16) hold no NaN or inf: the loader would serve garbage from them."""
    import numpy as np

    item = 4 if ttype == 0 else 2
    step = 1 << 24
    for begin in range(0, nbytes // item, step):
        count = min(step, nbytes // item - begin)
        raw = np.frombuffer(r.buf, dtype=np.uint32 if item == 4 else np.uint16, count=count,
                            offset=start + begin * item)
        exponent = {0: 0x7F800000, 1: 0x7C00, 30: 0x7F80}[ttype]
        bad = bool(((raw & exponent) == exponent).any())
        del raw  # the memory map cannot close while a view of it lives
        if bad:
            raise r.fail(f"tensor {name[:200]}", "holds NaN or inf values")


def _check_hparams(r: _Reader, meta: Dict[str, object], blocks: set, shapes: Dict[str, List[int]]) -> None:
    """The hyper-parameters of a supported architecture: integers in range, consistent with the tensors."""
    from sarathi.model_executor.models import GGUF_ARCHITECTURES

    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        return  # the converter names the unsupported architecture itself
    a = f"{arch}."
    for name, (low, high) in HPARAM_LIMITS.items():
        key = a + name
        if key not in meta:
            if name in OPTIONAL:
                continue
            raise r.fail(key, "is missing")
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise r.fail(key, f"must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise r.fail(key, f"{value} is not in [{low}, {high}]")
    n_layers = meta[a + "block_count"]
    if blocks != set(range(n_layers)):
        raise r.fail(a + "block_count", f"{n_layers}, but the tensors name {len(blocks)} decoder layers "
                                        f"(blk.{min(blocks, default=0)}..blk.{max(blocks, default=-1)})")
    heads = meta[a + "attention.head_count"]
    kv = meta.get(a + "attention.head_count_kv", heads)
    hidden = meta[a + "embedding_length"]
    head_dim = meta.get(a + "attention.key_length")
    if heads % kv or (head_dim is None and hidden % heads):
        raise r.fail(a + "attention.head_count", f"{heads} heads, {kv} kv heads and embedding_length {hidden} "
                                                 "do not divide")
    embed = shapes.get("token_embd.weight")
    if embed is None or len(embed) != 2 or embed[0] != hidden:
        raise r.fail("tensor token_embd.weight", f"shape {embed} does not match embedding_length {hidden}")
    for name, dims in shapes.items():
        if not name.endswith("_norm.weight"):
            continue
        per_head = name.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))  # Qwen3, Gemma 3: one head's width
        want = [head_dim or hidden // heads] if per_head else [hidden]
        if dims != want:
            raise r.fail(f"tensor {name[:200]}", f"shape {dims} is not {want} "
                                                 f"({'key_length' if per_head else 'embedding_length'})")
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa",
                "attn_logit_softcapping", "final_logit_softcapping"):
        value = meta.get(a + key)
        if value is not None and (isinstance(value, (bool, str, _Array)) or not 0 < float(value) < 1e30):
            raise r.fail(a + key, f"{value!r} is not a positive finite number")
