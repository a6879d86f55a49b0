"""CLI fuzzing generated from the argparse parsers: every flag of every subcommand that writes or
reads files (`sarathi quantize`, `sarathi lora train|merge`, `sarathi generate`, `adaptivocab
build|patch-model|finetune|teacher-targets|evaluate`) gets hostile values chosen by its type, in a
throwaway directory whose canary files (the working directory's, the home directory's, the input
model's) must survive every input. A flag added to a parser is fuzzed the day it lands.

Each input must end in success or one `error:` line: an exception escaping the command (a
traceback), a run past the time limit (a hang) or a changed canary (data loss) fails the test.
`generate` starts an engine, so its inputs run in subprocesses under a memory limit; the others
run in-process (a fork per input would cost more than the inputs). `serve` is left out: it starts
a server (its request fields are fuzzed by the server tests).

SARATHI_FUZZ_EXAMPLES sets the inputs per subcommand (default 6); the summary line is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from adaptivocab_testutil import stdlib_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("SARATHI_FUZZ_EXAMPLES", "6"))
TIME_LIMIT_S = 90
# Values a number parses to but a command must refuse or survive, then values it must not parse.
EDGE_INTS = ["0", "-1", "1", "2", "-9223372036854775809"]
EDGE_FLOATS = ["0", "-1", "0.5", "1", "nan", "inf", "-inf", "1e-320"]
SYNTAX = ["x", "", "1e309", "0x10", "1_000", "\udc80"]
BIG_NUMBERS = ["9223372036854775808", "99999999999999999999", "2147483647"]


class Hang(Exception):
    pass


def snapshot(path: Path) -> Dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A throwaway home and working directory with canaries, and valid inputs for every command."""
    from adaptivocab.__main__ import main as avmain
    from lora_testutil import make_adapter

    root = tmp_path_factory.mktemp("fuzz-cli")
    home, work = root / "home", root / "work"
    for d in (home, work):
        d.mkdir()
        (d / "canary.txt").write_text("must survive\n")
    project = work / "project"
    shutil.copytree(tiny_model_dir, project / "model")
    (project / "canary.txt").write_text("must survive\n")
    data = project / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the fuzzing data, short and plain"}) + "\n"
                            for i in range(6)))
    corpus = project / "corpus.txt"
    corpus.write_text(stdlib_file("glob.py").read_text(encoding="utf-8"))
    adapter = make_adapter(project / "model", project / "adapter", seed=0, r=2, alpha=4)
    avmain(["build", "--base", str(project / "model"), "--corpus", str(corpus), "--num-new-tokens", "8",
            "--max-ngram", "3", "--out", str(project / "pt")])
    avmain(["patch-model", "--model", str(project / "model"), "--patch-tokenizer", str(project / "pt"),
            "--out", str(project / "patched")])
    return {"root": root, "home": home, "work": work, "project": project, "model": project / "model",
            "data": data, "corpus": corpus, "adapter": adapter, "pt": project / "pt",
            "patched": project / "patched", "canaries": {p: snapshot(p) for p in (home, work, project)}}


def path_values(w) -> List[str]:
    """Hostile and ordinary values for a flag that names a file or directory."""
    return ["", ".", "/", "..", "~", "~/x", str(w["work"]), str(w["home"]), str(w["project"]), str(w["model"]),
            str(w["project"] / "canary.txt"), str(w["work"] / "no-such"), str(w["corpus"]), str(w["data"]),
            "\udc80", "x" * 5000, "a\tb", "/proc/self/mem", str(w["work"] / "out" / "deeper")]


SPEC_JSON = ['{"method": "ngram"}', '{"method": "early_exit", "num_early_exit_layers": 1}', "{", "[]", "null", "1e999",
             '{"method": "ngram", "num_speculative_tokens": -1}', '{"method": "draft_model", "model": "/proc/self/mem"}',
             '{"method": "ngram", "prompt_lookup_max": 99999999999999999999}', '{"method": "ngram", "x": 1}',
             '{"method": "early_exit", "num_early_exit_layers": 1000}', '{"method": "' + "x" * 5000 + '"}']


def value_for(action: argparse.Action, w, rnd: random.Random, cheap: bool) -> List[str]:
    """Values for one flag, chosen by what the parser says it takes."""
    if action.nargs == 0:
        return []
    if action.dest == "speculative_config":   # JSON: hostile documents as well as paths
        pool = SPEC_JSON + path_values(w)
    elif action.choices:
        pool = [str(c) for c in action.choices] + ["bogus", ""]
    elif action.type is int or getattr(action.type, "__name__", "") == "parse":
        pool = SYNTAX if rnd.random() < 0.2 else EDGE_INTS + ([] if cheap else BIG_NUMBERS)
    elif action.type is float or getattr(action.type, "__name__", "") in ("positive_float", "weight"):
        pool = SYNTAX if rnd.random() < 0.2 else EDGE_FLOATS + ([] if cheap else ["1e300"])
    else:
        pool = path_values(w) + ["0", "-1", "bogus"]
    count = rnd.choice([1, 2]) if action.nargs in ("+", "*") else 1
    return [rnd.choice(pool) for _ in range(count)]


# Per command: the parser, a valid argv, and the flags whose large values mean long work (fuzzed with
# invalid and small values only, so an input runs seconds, not hours).
def commands(w) -> Dict[str, dict]:
    from adaptivocab.__main__ import build_parser as av_parser
    from sarathi.__main__ import build_generate_parser
    from sarathi.lora_training.__main__ import build_parser as lora_parser
    from sarathi.quantize.__main__ import build_parser as quant_parser

    out = str(w["work"] / "out")
    lora_sub = {a.dest: a for a in lora_parser()._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    av_sub = {a.dest: a for a in av_parser()._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    m, corpus, patched = str(w["model"]), str(w["corpus"]), str(w["patched"])
    return {
        "quantize": dict(prefix=["quantize"], parser=quant_parser(),
                         argv=["--model", m, "--method", "rtn", "--group-size", "32", "--out", out, "--quiet",
                               "--threads", "1"],
                         cheap={"num_samples", "seq_len", "awq_grid", "batch_size", "threads"}),
        "lora train": dict(prefix=["lora", "train"], parser=lora_sub.choices["train"],
                           argv=["--base", m, "--data", str(w["data"]), "--out", out, "--max-steps", "1",
                                 "--eval-steps", "1", "--save-steps", "1", "--batch-size", "2", "--max-length",
                                 "16", "--threads", "1", "--r", "2"],
                           cheap={"max_steps", "epochs", "time_budget", "stop_after_steps", "eval_steps",
                                  "save_steps", "max_length", "batch_size", "grad_accum", "logging_steps", "r",
                                  "threads"}),
        "lora merge": dict(prefix=["lora", "merge"], parser=lora_sub.choices["merge"],
                           argv=["--base", m, "--adapter", str(w["adapter"]), "--out", out], cheap=set()),
        "adaptivocab build": dict(prefix=["build"], parser=av_sub.choices["build"],
                                  argv=["--base", m, "--corpus", corpus, "--num-new-tokens", "8", "--max-ngram", "3",
                                        "--out", out],
                                  cheap={"num_new_tokens", "max_ngram", "min_count"}),
        "adaptivocab patch-model": dict(prefix=["patch-model"], parser=av_sub.choices["patch-model"],
                                        argv=["--model", m, "--patch-tokenizer", str(w["pt"]), "--out", out],
                                        cheap=set()),
        "adaptivocab finetune": dict(prefix=["finetune"], parser=av_sub.choices["finetune"],
                                     argv=["--model", patched, "--corpus", corpus, "--seq-len", "16", "--batch-size",
                                           "1", "--max-tokens", "16", "--out", out, "--threads", "1"],
                                     cheap={"seq_len", "batch_size", "max_tokens", "max_minutes", "eval_every",
                                            "eval_bytes", "save_every", "threads"}),
        "adaptivocab teacher-targets": dict(prefix=["teacher-targets"], parser=av_sub.choices["teacher-targets"],
                                            argv=["--model", patched, "--corpus", corpus, "--out", out, "--seq-len",
                                                  "16", "--max-blocks", "2", "--threads", "1"],
                                            cheap={"seq_len", "max_blocks", "max_minutes", "top_k", "expand",
                                                   "threads"}),
        "adaptivocab evaluate": dict(prefix=["evaluate"], parser=av_sub.choices["evaluate"],
                                     argv=["--base", m, "--patched", patched, "--labels", "p", "--corpus", corpus,
                                           "--speed", "none", "--max-bytes", "300", "--out", out],
                                     cheap={"max_bytes", "window", "max_tokens", "concurrency", "rounds", "threads"}),
        "generate": dict(prefix=["generate"], parser=build_generate_parser(),
                         argv=["--prompt", "hi", "--model", m, "--max-tokens", "2"],
                         cheap={"max_tokens", "min_tokens", "n", "logprobs", "max_model_len", "max_num_seqs",
                                "max_num_batched_tokens", "num_kv_pages", "kv_cache_memory"}),
    }


def mutate(spec: dict, w, rnd: random.Random) -> List[str]:
    """The valid argv with 1-3 flags given hostile values or dropped (and --overwrite now and then)."""
    actions = [a for a in spec["parser"]._actions if a.option_strings and a.dest != "help"]
    argv = list(spec["argv"])
    for action in rnd.sample(actions, min(len(actions), rnd.choice([1, 2, 3]))):
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if flag in argv and rnd.random() < 0.15:  # drop it (and its value)
            i = argv.index(flag)
            del argv[i:i + 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else i + 1]
            continue
        argv += [flag, *value_for(action, w, rnd, action.dest in spec["cheap"])]
    if any("--overwrite" in a.option_strings for a in actions) and rnd.random() < 0.4:
        argv.append("--overwrite")
    return argv


def run_in_process(prefix: List[str], argv: List[str]):
    """(exit code, stderr, escaped exception or None) of one command run here."""
    from adaptivocab.__main__ import main as avmain
    from sarathi.__main__ import main as smain

    err = io.StringIO()
    escaped = None

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = smain(prefix + argv) if prefix[0] in ("quantize", "lora") else (avmain(prefix + argv) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except Hang:
        code, escaped = None, "hang"
    except BaseException as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        import traceback

        code, escaped = None, "".join(traceback.format_exception(e))[-1500:]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue(), escaped


def run_in_subprocess(prefix: List[str], argv: List[str], w):
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(w["home"]), "OMP_NUM_THREADS": "1",
           "SARATHI_CACHE": str(w["root"] / "cache")}
    try:
        argv = [a for a in argv if "\udc80" not in a and "\x00" not in a]
        p = subprocess.run([sys.executable, "-m", "sarathi", *prefix, *argv], cwd=w["work"], env=env,
                           capture_output=True, text=True, timeout=TIME_LIMIT_S, preexec_fn=limits)
    except subprocess.TimeoutExpired:
        return None, "", "hang"
    escaped = p.stderr[-1500:] if "Traceback" in p.stderr or p.returncode < 0 else None
    return p.returncode, p.stderr, escaped


def check_one(name: str, argv: List[str], code, err: str, escaped, w, tally: Dict[str, int],
              findings: List[str]) -> None:
    tally["inputs"] += 1
    shown = f"{name} {' '.join(a[:60] for a in argv)}"
    if escaped == "hang":
        tally["hangs"] += 1
        findings.append(f"HANG: {shown}")
    elif escaped is not None or "Traceback" in err:
        tally["tracebacks"] += 1
        findings.append(f"TRACEBACK: {shown}\n{escaped or err[-1500:]}")
    elif code == 0:
        tally["ok"] += 1
    else:
        lines = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
        if len(lines) == 1:
            tally["clean errors"] += 1
        else:
            tally["unclear errors"] += 1
            findings.append(f"NOT ONE ERROR LINE (exit {code}): {shown}\n{err[-800:]}")
    for path, before in w["canaries"].items():
        now = snapshot(path)
        lost = {k: v for k, v in before.items() if now.get(k) != v}
        if lost:
            tally["data loss"] += 1
            findings.append(f"DATA LOSS in {path} ({sorted(lost)[:5]}): {shown}")
            w["canaries"][path] = now  # report each loss once


def clean_outputs(w) -> None:
    """Remove what a successful input wrote, so the next one starts from the same world."""
    for base in (w["work"], w["home"]):
        for p in base.iterdir():
            if p.name != "canary.txt" and p.name != "project":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in w["project"].iterdir():
        if p.name not in ("model", "canary.txt", "train.jsonl", "corpus.txt", "adapter", "pt", "patched"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def test_cli_fuzz_every_subcommand(world, monkeypatch, capsys):
    w = world
    monkeypatch.setenv("HOME", str(w["home"]))
    monkeypatch.setenv("SARATHI_CACHE", str(w["root"] / "cache"))
    monkeypatch.chdir(w["work"])
    import torch

    threads = torch.get_num_threads()
    tally = {k: 0 for k in ("inputs", "ok", "clean errors", "unclear errors", "tracebacks", "hangs", "data loss")}
    findings: List[str] = []
    rnd = random.Random(int(os.environ.get("SARATHI_FUZZ_SEED", "25")))
    try:
        for name, spec in commands(w).items():
            n = max(2, EXAMPLES // 3) if name == "generate" else EXAMPLES
            for _ in range(n):
                argv = mutate(spec, w, rnd)
                t0 = time.monotonic()
                if name == "generate":
                    code, err, escaped = run_in_subprocess(spec["prefix"], argv, w)
                else:
                    code, err, escaped = run_in_process(spec["prefix"], argv)
                check_one(name, argv, code, err, escaped, w, tally, findings)
                clean_outputs(w)
                if os.environ.get("SARATHI_FUZZ_VERBOSE"):
                    with capsys.disabled():
                        print(f"{time.monotonic() - t0:7.1f}s {name}: exit {code} {err.strip()[-120:]!r}")
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print("\nCLI fuzz: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    if findings:
        with capsys.disabled():
            print("\n\n".join(findings[:10]))
    assert not findings, "\n\n".join(findings[:10])
    assert tally["tracebacks"] == tally["hangs"] == tally["data loss"] == 0
