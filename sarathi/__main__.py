"""`python -m sarathi generate ...` and `python -m sarathi serve ...` (also the `sarathi` script)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from sarathi.config import EngineConfig, add_engine_args


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", dest="sample_seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=False)


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sarathi generate",
                                description="Generate text offline with the engine.")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--chat", action="store_true", help="treat each prompt as a user message (chat template)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of plain text")
    p.add_argument("--lora", default=None, help="run with this LoRA adapter (one of --lora-modules)")
    add_engine_args(p)
    _sampling_args(p)
    return p


def generate_main(argv: Optional[List[str]] = None) -> int:
    from sarathi import LLM, LoRARequest, SamplingParams

    ns = build_generate_parser().parse_args(argv)
    try:
        config = EngineConfig.from_cli_args(ns)
        params = SamplingParams.from_request(vars(ns), seed=ns.sample_seed)
        llm = LLM(**{f: getattr(config, f) for f in config.__dataclass_fields__})
        lora = LoRARequest(ns.lora) if ns.lora else None
        if ns.chat:
            outs = [llm.chat([{"role": "user", "content": text}], params, lora_request=lora)[0] for text in ns.prompt]
        else:
            outs = llm.generate(ns.prompt, params, lora_request=lora)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(ns.prompt, outs):
        for c in out.outputs:
            if ns.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason}))
            else:
                print(c.text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sarathi {generate,serve,quantize,lora} [flags]   (each command has --help)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        return generate_main(rest)
    if cmd == "serve":
        from sarathi.entrypoints.openai.api_server import main as serve_main
        return serve_main(rest) or 0
    if cmd == "quantize":
        from sarathi.quantize.__main__ import main as quantize_main
        return quantize_main(rest, prog="sarathi quantize")
    if cmd == "lora":
        from sarathi.lora_training.__main__ import main as lora_main
        return lora_main(rest, prog="sarathi lora")
    print(f"unknown command {cmd!r}: expected generate, serve, quantize or lora", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
