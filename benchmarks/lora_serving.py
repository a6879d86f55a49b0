"""Serving many LoRA adapters at once vs the base model alone, same server build, same client.

One server process per configuration (each alone on the machine): the base model without
--enable-lora, then with four rank-16 adapters on every linear layer where the requests are
spread round-robin over the adapters (one step mixes all four: grouped matmuls). Rounds
alternate the two so drift on a shared machine hits both. The adapters are random PEFT
adapters (init_lora_weights=False): the cost of an adapter does not depend on its values.

    .venv/bin/python benchmarks/lora_serving.py --concurrency 32 --num-prompts 64 --rounds 2

Prints a table, writes benchmarks/results/lora-serving.json and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

import compare  # noqa: E402  (server start/stop helpers)
import serving  # noqa: E402


def make_adapters(model: str, out: Path, n: int, r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sarathi.model_executor.model_loader import resolve_model_dir

    paths = []
    for i in range(n):
        path = out / f"adapter-{i}"
        if not (path / "adapter_model.safetensors").is_file():
            torch.manual_seed(i)
            base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model)), dtype=torch.float32)
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=False,
                             task_type="CAUSAL_LM")
            m = get_peft_model(base, cfg)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.mul_(0.01)  # small deltas: the text stays fluent, the cost is the same
            m.save_pretrained(str(path))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8771)
    p.add_argument("--server-args", default="", help="extra flags for both servers")
    p.add_argument("--result-dir", default=str(serving.RESULTS_DIR))
    args = p.parse_args()
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(args.model, HERE.parent / ".cache" / "lora-adapters", args.num_adapters, args.rank)
    names = [f"lora{i}" for i in range(len(adapters))]
    tokenizer = serving.load_tokenizer(args.model)
    configs = {
        "base only": ([], None),
        f"{len(names)} adapters": (["--enable-lora", "--max-loras", str(len(names)), "--max-lora-rank", str(args.rank),
                                    "--lora-modules", *[f"{n}={a}" for n, a in zip(names, adapters)]], names),
    }
    runs = []
    for rnd in range(args.rounds):
        for label, (flags, models) in configs.items():
            ns = argparse.Namespace(gguf=None, sarathi_model=args.model, port=args.port,
                                    sarathi_args=" ".join(flags + args.server_args.split()))
            proc, url = compare.start("sarathi", ns, out_dir)
            try:
                bench = serving.add_args(argparse.ArgumentParser()).parse_args([
                    "--base-url", url, "--num-prompts", str(args.num_prompts), "--max-concurrency",
                    str(args.concurrency), "--random-input-len", str(args.input_len), "--random-output-len",
                    str(args.output_len), "--seed", str(1000 + rnd), "--label", f"lora-{rnd}-{label.replace(' ', '-')}",
                    "--result-dir", str(out_dir / "lora-serving-runs")])
                bench.models = models
                s = serving.run(bench, tokenizer)
            finally:
                compare.stop(proc)
            runs.append({"round": rnd, "config": label, "output_throughput": s["output_throughput"],
                         "median_ttft_ms": s["ttft_ms"]["median"], "median_tpot_ms": s["tpot_ms"]["median"],
                         "completed": s["completed"], "failed": s["failed"]})
            print(json.dumps(runs[-1]))
    summary = {}
    for label in configs:
        rows = [r for r in runs if r["config"] == label]
        summary[label] = {k: sum(r[k] for r in rows) / len(rows) for k in
                          ("output_throughput", "median_ttft_ms", "median_tpot_ms")}
    base, multi = summary["base only"], summary[f"{len(names)} adapters"]
    ratio = multi["output_throughput"] / base["output_throughput"]
    print(f"\n| config (c={args.concurrency}, {args.num_prompts} requests x {args.rounds} rounds) | output tok/s "
          "| median TTFT ms | median TPOT ms |\n|---|---|---|---|")
    for label, s in summary.items():
        print(f"| {label} | {s['output_throughput']:.1f} | {s['median_ttft_ms']:.0f} | {s['median_tpot_ms']:.1f} |")
    print(f"\nadapters / base output throughput: {ratio:.2f}x")
    result = {"args": vars(args), "runs": runs, "summary": summary, "ratio": ratio, "time": time.time()}
    (out_dir / "lora-serving.json").write_text(json.dumps(result, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label in configs:
        rows = [r for r in runs if r["config"] == label]
        ax.plot([r["round"] for r in rows], [r["output_throughput"] for r in rows], "o-", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"LoRA serving, concurrency {args.concurrency} (ratio {ratio:.2f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lora-serving.png", dpi=120)
    print(f"saved {out_dir / 'lora-serving.json'} and .png")


if __name__ == "__main__":
    main()
