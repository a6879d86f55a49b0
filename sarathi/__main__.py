"""`python -m sarathi generate ...` and `python -m sarathi serve ...` (also the `sarathi` script)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import List, Optional

from sarathi.config import EngineConfig, add_engine_args
from sarathi.sampling_params import SamplingParams


# SamplingParams fields offered as flags, with the annotation's argparse type; `seed` is
# --sample-seed (--seed is the engine's). The CLI decodes greedily and longer by default.
_SAMPLING_FLAG_TYPES = {"int": int, "float": float, "Optional[int]": int, "Optional[str]": str,
                        "Union[None, str, List[str]]": str, "Optional[List[int]]": int}
_SAMPLING_CLI_DEFAULTS = {"temperature": 0.0, "max_tokens": 64}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """A flag per SamplingParams field of a plain type (lists repeat the flag), its default the field's."""
    g = p.add_argument_group("sampling")
    for f in fields(SamplingParams):
        if not f.init or (f.type not in _SAMPLING_FLAG_TYPES and f.type != "bool"):
            continue
        name = "--sample-seed" if f.name == "seed" else "--" + f.name.replace("_", "-")
        default = _SAMPLING_CLI_DEFAULTS.get(f.name, f.default)
        if f.type == "bool":
            g.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif "List" in f.type:
            g.add_argument(name, dest=f.name, type=_SAMPLING_FLAG_TYPES[f.type], action="append", default=None,
                           help="repeatable")
        else:
            g.add_argument(name, dest=f.name, type=_SAMPLING_FLAG_TYPES[f.type], default=default,
                           help=f"(default: {default})")


def sampling_params_from_args(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{f.name: getattr(ns, f.name) for f in fields(SamplingParams)
                             if f.init and hasattr(ns, f.name) and getattr(ns, f.name) is not None})


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
    from sarathi import LLM, LoRARequest

    ns = build_generate_parser().parse_args(argv)
    try:
        config = EngineConfig.from_cli_args(ns)
        params = sampling_params_from_args(ns)
        llm = LLM(**config.settings())
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
