"""Before/after: one benchmark command run in two checkouts, alternated, in one sitting.

Each round runs the command in the "before" tree and then the "after" tree (the order flips every
round, so a machine that slows down or warms up over time favours neither), reads the JSON the
command wrote and prints each chosen figure per round, the medians and after/before.

    git worktree add --detach /tmp/before <commit>       # (copy or build its native extensions)
    .venv/bin/python benchmarks/ab_revisions.py --before /tmp/before --after . --rounds 2 \\
        --cmd '.venv/bin/python benchmarks/throughput.py --skip-hf --scale 0.25 --workloads decode,single --out {out}' \\
        --metric workloads.decode.engine.output_tok_s workloads.single.engine.output_tok_s

`{out}` in the command is replaced by a fresh JSON path for each run; a metric is a dotted path
into that JSON (list items by index). The python in the command is resolved in each tree, so a
relative `.venv/bin/python` uses that tree's (or the one it links to).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptivocab.outdir import write_result_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def dig(data: Any, path: str) -> float:
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return float(data)


def run_once(tree: Path, cmd: str, out: Path, timeout: float) -> Dict[str, Any]:
    argv = shlex.split(cmd.replace("{out}", str(out)))
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"error: the command failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - t, "result": json.loads(out.read_text())}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout measured as 'before'")
    p.add_argument("--after", required=True, help="checkout measured as 'after'")
    p.add_argument("--cmd", required=True, help="benchmark command; {out} is its JSON output path")
    p.add_argument("--metric", nargs="+", required=True, help="dotted paths into the JSON")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--label", default="ab", help="result file name: benchmarks/results/<label>.json")
    ns = p.parse_args(argv)
    if "{out}" not in ns.cmd:
        p.error("--cmd must contain {out}")
    if ns.rounds < 1:
        p.error("--rounds must be >= 1")
    trees = {"before": Path(ns.before).expanduser().resolve(), "after": Path(ns.after).expanduser().resolve()}
    for name, tree in trees.items():
        if not tree.is_dir():
            p.error(f"--{name} {tree} is not a directory")
    runs: Dict[str, List[Dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        for r in range(ns.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                out = Path(tmp) / f"{name}-{r}.json"
                res = run_once(trees[name], ns.cmd, out, ns.timeout)
                figures = {m: dig(res["result"], m) for m in ns.metric}
                runs[name].append(figures)
                print(f"round {r + 1} {name:6s} " + "  ".join(f"{m}={v:.2f}" for m, v in figures.items()), flush=True)
    summary = {}
    print(f"\n| metric | before (median of {ns.rounds}) | after | after / before |\n|---|---|---|---|")
    for m in ns.metric:
        b = statistics.median(x[m] for x in runs["before"])
        a = statistics.median(x[m] for x in runs["after"])
        summary[m] = {"before": b, "after": a, "ratio": a / b if b else None}
        print(f"| {m} | {b:.2f} | {a:.2f} | {a / b:.3f} |" if b else f"| {m} | {b} | {a} | - |")
    write_result_file(RESULTS / f"{ns.label}.json", json.dumps(
        {"before": str(trees["before"]), "after": str(trees["after"]), "cmd": ns.cmd, "rounds": runs,
         "summary": summary}, indent=2))
    print(f"saved {RESULTS / (ns.label + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
