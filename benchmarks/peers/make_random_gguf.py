"""Write a Llama-shaped GGUF with random weights, for speed comparisons at sizes we ship no model of.

    .venv/bin/python benchmarks/peers/make_random_gguf.py --out /tmp/llama-1b-random-q4_0.gguf

Default shape: a ~1B Llama (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192, tied
embeddings), SmolLM2's tokenizer (its GGUF metadata copied from the embedded model, so
llama-server and our server read the same file). Linear weights and the embedding are Q4_0
(gguf-py's reference quantizer, the same blocks llama-quantize writes), norms float32. The text
it generates is noise; only the speed means anything. Never overwrites an existing file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; not overwriting it")

    import gguf

    from sarathi.model_executor.model_loader import _embedded_smollm2

    src = gguf.GGUFReader(str(_embedded_smollm2()))
    vocab = int(src.fields["llama.vocab_size"].parts[-1][0])
    h, hd = args.hidden, args.hidden // args.heads
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"random llama {args.layers}x{h}")
    w.add_block_count(args.layers)
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_feed_forward_length(args.intermediate)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, field in src.fields.items():  # the tokenizer, as the embedded model has it
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            if field.types[1] == gguf.GGUFValueType.STRING:
                w.add_array(name, [bytes(x).decode("utf-8") for x in items])
            else:
                w.add_array(name, [x.tolist()[0] for x in items])
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            w.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)

    rng = np.random.default_rng(args.seed)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def quantized(name: str, rows: int, cols: int, std: float) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, q4), raw_dtype=q4)

    quantized("token_embd.weight", vocab, h, 1.0)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    kv = args.kv_heads * hd
    for i in range(args.layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, dtype=np.float32))
        for name, rows, cols in (("attn_q", h, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, h),
                                 ("ffn_gate", args.intermediate, h), ("ffn_up", args.intermediate, h),
                                 ("ffn_down", h, args.intermediate)):
            quantized(b + name + ".weight", rows, cols, cols ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
