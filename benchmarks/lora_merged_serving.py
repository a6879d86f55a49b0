"""The documented LoRA chain end to end, then served against llama-server.

fine-tuned adapter -> `sarathi lora merge` (HF safetensors) -> two 8-bit copies of the same
merged weights: `sarathi quantize --method rtn --bits 8 --lm-head` (a GPTQ checkpoint, what our
server loads from the chain; its LM head quantized as the GGUF's Q8_0 one is: a float head was
113 of the ~250 MB streamed per token) and llama.cpp's `convert_hf_to_gguf.py --outtype q8_0`
(written with the gguf package's writer). Our server serves the GPTQ checkpoint, llama-server the GGUF; each runs
alone and gets the same client and prompts (benchmarks/peers/compare.py), two full waves per
concurrency level.

    .venv/bin/python benchmarks/lora_merged_serving.py --adapter .cache/lora-finetune/adapter-none

Needs benchmarks/peers/build/llama-server (benchmarks/peers/build_llama_server.sh) and its
llama.cpp source tree (for the converter). Writes benchmarks/results/lora-merged/ (JSON, PNG).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LLAMA_CPP = HERE / "peers" / "build" / "src" / "llama.cpp"


def run(cmd) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=str(REPO / ".cache" / "lora-finetune" / "adapter-none"))
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--work", default=str(REPO / ".cache" / "lora-merged"))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    p.add_argument("--num-prompts", nargs="+", type=int, default=[8, 64])
    p.add_argument("--result-dir", default=str(HERE / "results" / "lora-merged"))
    args = p.parse_args()
    py = sys.executable
    work = Path(args.work)
    merged, quant, gguf = work / "merged", work / "merged-rtn8-head", work / "merged.q8_0.gguf"
    if not (merged / "config.json").is_file():
        run([py, "-m", "sarathi.lora", "merge", "--base", args.base, "--adapter", args.adapter, "--out", merged])
    if not (quant / "config.json").is_file():
        run([py, "-m", "sarathi.quantize", "--model", merged, "--method", "rtn", "--bits", "8", "--group-size", "32",
             "--lm-head", "--out", quant, "--overwrite"])
    if not gguf.is_file():
        run([py, LLAMA_CPP / "convert_hf_to_gguf.py", merged, "--outtype", "q8_0", "--outfile", gguf])
    run([py, HERE / "peers" / "compare.py", "--systems", "sarathi", "llama-server", "--gguf", gguf,
         "--sarathi-model", quant, "--concurrency", *args.concurrency, "--num-prompts", *args.num_prompts,
         "--result-dir", args.result_dir])
    summary = json.loads((Path(args.result_dir) / "serving-compare.json").read_text())
    summary["chain"] = {"adapter": args.adapter, "merged": str(merged), "sarathi_model": str(quant),
                        "gguf": str(gguf)}
    (Path(args.result_dir) / "serving-compare.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
