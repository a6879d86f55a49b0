"""The docs cannot rot: every command, code block and link in README.md and docs/*.md is checked.

- Shell lines (```bash / ```sh / ```console blocks) that run one of our CLIs have their flags parsed by
  the real argparse parser (`parse_args` only; nothing runs): `sarathi ...`, `python -m sarathi...`,
  `python -m adaptivocab ...`, `python benchmarks/<x>.py ...`; `make` targets must exist in the
  Makefile (and `make serve ARGS=...` parses as `sarathi serve`); a bare program must be a console
  script of pyproject.toml; `pip install '.[extra]'` names extras pyproject.toml declares;
  `python -m pytest` paths and `configs/*.yaml` paths must exist; `curl` with a body sends
  `Content-Type: application/json` (the server refuses other bodies).
- ```python blocks compile, and their imports resolve (modules found, imported names present,
  attributes of imported modules present) without the block being run.
- Every intra-repo link ([text](path#anchor)) names an existing file, and an anchor a heading of
  that file (GitHub's slugs).

Benchmark scripts build their parsers inside main() after module-level set-up (sys.path, environment
variables, heavy imports), so they are checked in one subprocess that imports each script, lets its
main() build the parser and stops it at parse_args.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}


# ---------------------------------------------------------------------------------------------
# Markdown parsing


@dataclass
class Block:
    path: Path
    line: int          # line of the opening fence
    lang: str
    text: str


def fenced_blocks(path: Path) -> List[Block]:
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start, body = m.group(2), m.group(3).lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(path, start, lang, "\n".join(body)))
        i += 1
    return blocks


def prose(text: str, blank_code_spans: bool = True) -> str:
    """The text outside fenced blocks, with inline code spans blanked (links there are not links)."""
    out, in_fence, fence = [], False, ""
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m and (not in_fence or line.strip().startswith(fence)):
            in_fence, fence = (not in_fence), m.group(1)
            out.append("")
            continue
        if in_fence:
            out.append("")
        elif blank_code_spans:
            out.append(re.sub(r"(`+)(.+?)\1", lambda c: " " * len(c.group(0)), line))
        else:
            out.append(line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)       # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8"), blank_code_spans=False).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    # explicit HTML anchors
    out.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    return out


# ---------------------------------------------------------------------------------------------
# Shell lines


def logical_lines(block: Block) -> List[Tuple[int, str]]:
    """(line number, command) pairs: backslash continuations and open quotes joined, comments kept
    for shlex to drop; in console blocks only `$ ` lines are commands."""
    out, buf, first = [], "", 0
    for n, raw in enumerate(block.text.splitlines(), block.line + 1):
        line = raw
        if not buf:
            if block.lang == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            if not line.strip():
                continue
            first = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        try:
            shlex.split(buf, comments=True)
        except ValueError:          # an open quote: the command goes on on the next line
            buf += "\n"
            continue
        out.append((first, buf))
        buf = ""
    assert not buf, f"{block.path.name}:{first}: unterminated command {buf!r}"
    return out


def simple_commands(line: str) -> List[List[str]]:
    """Split a shell line into simple commands (on | && || ; &), dropping redirections and
    leading VAR=value assignments."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    cmds, cur, skip_next = [], [], False
    for tok in lex:
        if skip_next:
            skip_next = False
            continue
        if tok in ("|", "||", "&&", ";", "&", "(", ")"):
            cmds.append(cur)
            cur = []
        elif tok in (">", ">>", "<", "2>", "&>", "2>&1", ">&"):
            skip_next = tok != "2>&1"
        else:
            cur.append(tok)
    cmds.append(cur)
    out = []
    for c in cmds:
        while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]):
            c = c[1:]
        if c:
            out.append(c)
    return out


class Parsed(Exception):
    """Raised by the patched parse_args once the arguments have parsed."""


@contextlib.contextmanager
def stop_at_parse_args():
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_with(build: Callable[[], argparse.ArgumentParser], args: List[str]) -> Optional[str]:
    """None when `args` parse, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build().parse_args(args)
    except SystemExit as e:
        return err.getvalue().strip() or f"exit {e.code}"
    return None


def parse_main(main: Callable[[List[str]], object], args: List[str]) -> Optional[str]:
    """For CLIs that build their parser inside main(argv): stop main at parse_args."""
    err = io.StringIO()
    try:
        with stop_at_parse_args(), contextlib.redirect_stderr(err):
            main(args)
    except Parsed:
        return None
    except SystemExit as e:
        return err.getvalue().strip() or f"exit {e.code}"
    raise AssertionError("main() returned without reaching parse_args")


def generate_parser():
    from sarathi.__main__ import build_generate_parser
    return build_generate_parser()


def serve_parser():
    from sarathi.entrypoints.openai.api_server import make_arg_parser
    return make_arg_parser()


def quantize_parser():
    from sarathi.quantize.__main__ import build_parser
    return build_parser()


def lora_parser():
    from sarathi.lora_training.__main__ import build_parser
    return build_parser()


def adaptivocab_parser():
    from adaptivocab.__main__ import build_parser
    return build_parser()


def optimal_sampling_main(argv):
    from sarathi.optimal_sampling.__main__ import main
    return main(argv)


SARATHI_SUBCOMMANDS = {"generate": generate_parser, "serve": serve_parser, "quantize": quantize_parser,
                       "lora": lora_parser}
MODULES = {"sarathi.quantize": quantize_parser, "sarathi.lora_training": lora_parser,
           "sarathi.entrypoints.openai.api_server": serve_parser,
           "sarathi.entrypoints.openai_server.api_server": serve_parser, "adaptivocab": adaptivocab_parser}


def console_scripts() -> set:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.S | re.M)
    return set(re.findall(r"^([\w-]+)\s*=", section.group(1), re.M)) if section else set()


def extras() -> set:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?:^\[|\Z)", text, re.S | re.M)
    return set(re.findall(r"^([\w-]+)\s*=", section.group(1), re.M)) if section else set()


def make_targets() -> set:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


@dataclass
class Command:
    where: str
    argv: List[str]


def all_commands() -> List[Command]:
    out = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            if block.lang not in SHELL_LANGS:
                continue
            for line_no, line in logical_lines(block):
                for argv in simple_commands(line):
                    out.append(Command(f"{path.relative_to(ROOT)}:{line_no}", argv))
    return out


COMMANDS = all_commands()


def check_command(argv: List[str]) -> Tuple[str, Optional[str]]:
    """(what was checked, error or None); ('', None) for commands that are not ours."""
    prog, rest = argv[0], argv[1:]
    for arg in rest:
        if arg.startswith("configs/") and not (ROOT / arg).exists():
            return "preset", f"{arg} does not exist"
    if prog.endswith("/sarathi") or prog == "sarathi":
        if prog == "sarathi" and "sarathi" not in console_scripts():
            return "sarathi", "no `sarathi` console script in pyproject.toml"
        return check_sarathi(rest)
    if prog == "adaptivocab":
        if "adaptivocab" not in console_scripts():
            return "adaptivocab", "`adaptivocab` is not a console script: write `python -m adaptivocab`"
        return "adaptivocab", parse_with(adaptivocab_parser, rest)
    if prog == "make":
        targets = [a for a in rest if "=" not in a and not a.startswith("-")]
        missing = sorted(set(targets) - make_targets())
        if missing:
            return "make", f"no Makefile target {missing}"
        for a in rest:
            if a.startswith("ARGS=") and "serve" in targets:
                return "make serve ARGS", parse_with(serve_parser, shlex.split(a[len("ARGS="):]))
        return "make", None
    if prog in PYTHONS and rest[:1] == ["-m"] and len(rest) >= 2:
        module, args = rest[1], rest[2:]
        if module == "sarathi":
            return check_sarathi(args)
        if module in MODULES:
            return module, parse_with(MODULES[module], args)
        if module == "sarathi.optimal_sampling":
            return module, parse_main(optimal_sampling_main, args)
        if module.startswith(("sarathi", "adaptivocab")):
            return module, f"no parser known for `python -m {module}`: add it to tests/test_docs.py"
        if module == "pytest":
            paths = [a.split("::")[0] for a in args if not a.startswith("-")]
            missing = [p for p in paths if not (ROOT / p).exists()]
            return "pytest", f"missing test files {missing}" if missing else None
        return "", None
    if prog in PYTHONS and rest and rest[0].startswith("benchmarks/") and rest[0].endswith(".py"):
        return "benchmark", None      # parsed together in one subprocess, see test_benchmark_commands
    if prog == "pip" and rest[:1] == ["install"]:
        wanted = {e.strip() for a in rest for e in re.findall(r"^\.\[([^\]]+)\]$", a) for e in e.split(",")}
        missing = sorted(wanted - extras())
        return ("pip extras", f"no extra {missing} in pyproject.toml") if missing else ("pip extras" if wanted else "", None)
    if prog == "curl" and any(a in ("-d", "--data", "--data-raw") for a in rest):
        # the server parses a body as JSON only when it says so
        json_header = any(a.lower().replace(" ", "") == "content-type:application/json" for a in rest)
        return "curl", None if json_header else "a JSON body needs -H 'Content-Type: application/json'"
    if prog in ("bash", "sh") and rest and not rest[0].startswith("-"):
        return "script", None if (ROOT / rest[0]).exists() else f"{rest[0]} does not exist"
    return "", None


def check_sarathi(args: List[str]) -> Tuple[str, Optional[str]]:
    if not args or args[0] not in SARATHI_SUBCOMMANDS:
        return "sarathi", f"unknown sarathi command {args[:1]}"
    return f"sarathi {args[0]}", parse_with(SARATHI_SUBCOMMANDS[args[0]], args[1:])


def test_docs_exist_and_have_commands():
    assert (ROOT / "README.md").exists() and len(DOC_FILES) > 5
    checked = [c for c in COMMANDS if check_command(c.argv)[0]]
    assert len(checked) > 40, [c.argv for c in checked]


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 220


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if not (c.argv[0] in PYTHONS and len(c.argv) > 1
                                                            and c.argv[1].startswith("benchmarks/"))],
                         ids=lambda c: c.where)
def test_command_parses(cmd: Command):
    what, error = check_command(cmd.argv)
    assert error is None, f"{cmd.where}: `{shlex.join(cmd.argv)}` ({what}): {error}"


# One subprocess for every benchmark command: each script is imported (its module-level set-up stays
# in that process) and its main() stopped at parse_args.
_BENCH_CHECK = r"""
import argparse, contextlib, importlib.util, io, json, sys
from pathlib import Path
root = Path(sys.argv[1])
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
def stop(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))
results, modules = [], {}
for script, args in json.loads(sys.stdin.read()):
    path = root / script
    if not path.exists():
        results.append(f"{script} does not exist"); continue
    try:
        if script not in modules:
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location("docs_bench_" + path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod          # dataclasses look their module up there
            spec.loader.exec_module(mod)
            modules[script] = mod
        mod = modules[script]
        if not hasattr(mod, "main"):
            results.append(f"{script} has no main()"); continue
        sys.argv = [script, *args]
        err = io.StringIO()
        argparse.ArgumentParser.parse_args = stop
        try:
            with contextlib.redirect_stderr(err):
                mod.main()
            results.append(f"{script}: main() returned without reaching parse_args")
        except Parsed:
            results.append(None)
        except SystemExit as e:
            results.append(err.getvalue().strip() or f"exit {e.code}")
        finally:
            argparse.ArgumentParser.parse_args = original
    except Exception as e:
        results.append(f"{script}: {type(e).__name__}: {e}")
print("\n" + json.dumps(results))
"""


def test_benchmark_commands():
    cmds = [c for c in COMMANDS if c.argv[0] in PYTHONS and len(c.argv) > 1 and c.argv[1].startswith("benchmarks/")
            and c.argv[1].endswith(".py")]
    assert cmds, "the docs show no benchmark command"
    bogus = ("benchmarks/serving.py", ["--no-such-flag"])      # the check itself must catch a bad flag
    proc = subprocess.run([sys.executable, "-c", _BENCH_CHECK, str(ROOT)], input=json.dumps(
        [(c.argv[1], c.argv[2:]) for c in cmds] + [bogus]), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, bogus_result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bogus_result and "--no-such-flag" in bogus_result, bogus_result
    failures = [f"{c.where}: `{shlex.join(c.argv)}`: {r}" for c, r in zip(cmds, results) if r is not None]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Python blocks


PYTHON_BLOCKS = [b for path in DOC_FILES for b in fenced_blocks(path) if b.lang in ("python", "py")]


def check_python_block(block: Block) -> List[str]:
    tree = compile(block.text, f"{block.path.name}:{block.line}", "exec", ast.PyCF_ONLY_AST)
    compile(tree, f"{block.path.name}:{block.line}", "exec")
    problems, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if importlib.util.find_spec(a.name) is None:
                    problems.append(f"no module {a.name}")
                else:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module is None:
                problems.append("relative import")
                continue
            try:
                mod = importlib.import_module(node.module)
            except ImportError as e:
                problems.append(f"cannot import {node.module}: {e}")
                continue
            for a in node.names:
                if a.name != "*" and not hasattr(mod, a.name) and \
                        importlib.util.find_spec(f"{node.module}.{a.name}") is None:
                    problems.append(f"{node.module} has no {a.name}")
    for node in ast.walk(tree):        # module.attr for the modules the block imports
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod = importlib.import_module(aliases[node.value.id])
            if not hasattr(mod, node.attr):
                problems.append(f"{aliases[node.value.id]} has no {node.attr}")
    return problems


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"{b.path.relative_to(ROOT)}:{b.line}")
def test_python_block_compiles_and_imports_resolve(block: Block):
    assert check_python_block(block) == []


# ---------------------------------------------------------------------------------------------
# Links


LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links() -> List[Tuple[Path, str]]:
    return [(path, m.group(1)) for path in DOC_FILES
            for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def test_intra_repo_links_resolve():
    problems, count = [], 0
    for path, target in links():
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
            continue
        count += 1
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            continue
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{path.relative_to(ROOT)}: {target}: outside the repository")
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor}")
    assert count > 20
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("argv", [
    ["sarathi", "serve", "--no-such-flag"], ["sarathi", "frobnicate"], ["python", "-m", "sarathi", "generate"],
    ["sarathi", "quantize", "--method", "bogus", "--out", "x"], ["sarathi", "lora", "train", "--nope"],
    ["python", "-m", "adaptivocab", "build", "--bogus"], ["adaptivocab", "build"], ["make", "no-such-target"],
    ["make", "serve", "ARGS=--port notanumber"], ["python", "-m", "sarathi.optimal_sampling", "--theta-url", "x"],
    ["python", "-m", "sarathi.nonexistent"], ["python", "-m", "pytest", "tests/test_no_such_file.py"],
    ["sarathi", "serve", "--config", "configs/no-such.yaml"], ["pip", "install", "-e", ".[nosuchextra]"],
    ["curl", "127.0.0.1:8000/v1/completions", "-d", "{}"]])
def test_checker_catches_rot(argv):
    assert check_command(argv)[1], argv


def test_python_check_catches_rot():
    bad = Block(ROOT / "README.md", 0, "python", "from sarathi import NoSuchThing\nimport vattention_ext as va\n"
                                              "va.no_such_function()\nimport no_such_module_xyz\n")
    assert len(check_python_block(bad)) == 3
    with pytest.raises(SyntaxError):
        check_python_block(Block(ROOT / "README.md", 0, "python", "def f(:\n"))


def test_github_slug():
    assert github_slug("Quantized weights and `sarathi quantize`") == "quantized-weights-and-sarathi-quantize"
    assert github_slug("Scale-out on Ray: replicas (2 × 1)") == "scale-out-on-ray-replicas-2--1"
    assert github_slug("How a request flows") == "how-a-request-flows"
