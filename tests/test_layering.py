"""The package layering holds: read from the source with `ast`, no import is executed.

entrypoints -> engine -> {core, model_executor, lora, optimal_sampling, structured_outputs, spec_decode} -> vattention_ext;
spec_decode sits on model_executor (a runner-side component) and core; `sarathi.config` reads only its
torch-free `spec_decode.config`;
`core` is torch-free; serving never imports LoRA training; no import circle between modules
(imports inside functions count: a lazy import still ties the two modules together).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sarathi", "vattention_ext", "adaptivocab")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Dict[str, Set[str]]:
    """module -> the modules of ours (and top-level third-party names) it imports anywhere."""
    graph: Dict[str, Set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = _module_name(path)
            is_pkg = path.name == "__init__.py"
            found: Set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:   # relative: resolve against this module's package
                        base = name.split(".") if is_pkg else name.split(".")[:-1]
                        base = base[:len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)   # `from pkg import module`
            graph[name] = found
    return graph


GRAPH = _imports()


def _ours(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def _importers_of(prefix: str) -> List[str]:
    return sorted(m for m, targets in GRAPH.items() if any(t == prefix or t.startswith(prefix + ".")
                                                           for t in targets))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_circle():
    graph = _ours(GRAPH)
    # a package's __init__ importing its own submodules is not a circle of design
    graph = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_is_torch_free():
    offenders = sorted(m for m in GRAPH if _within(m, "sarathi.core")
                       and any(t == "torch" or t.startswith("torch.") for t in GRAPH[m]))
    assert not offenders, f"sarathi.core must not import torch: {offenders}"


def test_layers_point_one_way():
    rules = {   # a package -> what it must not import
        "sarathi.core": ("sarathi.engine", "sarathi.entrypoints", "sarathi.model_executor", "sarathi.lora",
                         "sarathi.optimal_sampling", "sarathi.structured_outputs", "sarathi.spec_decode"),
        "sarathi.model_executor": ("sarathi.engine", "sarathi.entrypoints", "sarathi.lora",
                                   "sarathi.optimal_sampling", "sarathi.lora_training", "sarathi.structured_outputs",
                                   "sarathi.spec_decode"),
        "sarathi.spec_decode": ("sarathi.engine", "sarathi.entrypoints", "sarathi.lora", "sarathi.optimal_sampling",
                                "sarathi.structured_outputs", "sarathi.lora_training"),
        "sarathi.engine": ("sarathi.entrypoints",),
        "sarathi.lora": ("sarathi.engine", "sarathi.entrypoints", "sarathi.lora_training"),
        "sarathi.optimal_sampling": ("sarathi.entrypoints", "sarathi.lora_training", "sarathi.spec_decode"),
        "sarathi.structured_outputs": ("sarathi.engine", "sarathi.entrypoints", "sarathi.model_executor",
                                       "sarathi.lora", "sarathi.optimal_sampling", "sarathi.spec_decode"),
        "vattention_ext": ("sarathi",),
    }
    broken = []
    for package, forbidden in rules.items():
        for m, targets in GRAPH.items():
            if _within(m, package):
                broken += [f"{m} -> {t}" for t in targets for f in forbidden if _within(t, f)]
    assert not broken, "imports against the layering: " + ", ".join(sorted(broken))


def test_serving_never_imports_training():
    serving = [m for m in GRAPH if _within(m, "sarathi") and not _within(m, "sarathi.lora_training")
               and m not in ("sarathi.__main__",)]   # the CLI dispatches to `sarathi lora` lazily
    broken = sorted(m for m in serving if any(_within(t, "sarathi.lora_training") for t in GRAPH[m]))
    assert not broken, f"serving modules importing LoRA training: {broken}"
    assert _importers_of("sarathi.lora_training") == ["sarathi.__main__"] + sorted(
        m for m in GRAPH if _within(m, "sarathi.lora_training")
        and any(_within(t, "sarathi.lora_training") for t in GRAPH[m]))
