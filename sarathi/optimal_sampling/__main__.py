"""`python -m sarathi.optimal_sampling --theta-url URL --t-url URL --prompts FILE --out FILE.jsonl`"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional


def read_prompts(path: str) -> List[str]:
    """JSONL of {"prompt": ...}, or plain text with one prompt a line."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected {{\"prompt\": \"...\"}}")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sarathi.optimal_sampling",
                                description="Two-model optimal sampling over two OpenAI-compatible endpoints")
    p.add_argument("--theta-url", required=True, help="server of the policy pi_theta")
    p.add_argument("--t-url", required=True, help="server of the target pi_t")
    p.add_argument("--theta-model", default=None)
    p.add_argument("--t-model", default=None)
    p.add_argument("--tokenizer", default="smollm2-135m-instruct", help="the models' tokenizer (alias or dir)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True, help="JSONL of GenerationOutput")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=20, help="candidates asked of each server per token")
    p.add_argument("--alpha", default="auto", help="'auto' (KL symmetry) or a number in [0, 1]")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-retries", type=int, default=4)
    ns = p.parse_args(argv)
    from sarathi.model_executor.model_loader import resolve_model_dir
    from sarathi.optimal_sampling.coordinator import Coordinator, CoordinatorConfig
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    try:
        alpha = ns.alpha if ns.alpha == "auto" else float(ns.alpha)
        prompts = read_prompts(ns.prompts)
        tokenizer = get_tokenizer(resolve_model_dir(ns.tokenizer))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = CoordinatorConfig(ns.theta_url, ns.t_url, ns.theta_model, ns.t_model, ns.top_k, alpha,
                               timeout=ns.timeout, max_retries=ns.max_retries)

    async def run():
        async with Coordinator(config, tokenizer) as c:
            return await c.generate_batch(prompts, ns.max_tokens, ns.seed, ns.concurrency)

    outs = asyncio.run(run())
    with open(ns.out, "w") as f:
        for o in outs:
            f.write(json.dumps(asdict(o)) + "\n")
    failed = sum(1 for o in outs if o.error)
    print(f"{len(outs) - failed} generated, {failed} failed -> {ns.out}", file=sys.stderr)
    return 1 if failed == len(outs) else 0


if __name__ == "__main__":
    sys.exit(main())
