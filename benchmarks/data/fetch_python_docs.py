"""Fetch the Python 3.11 documentation sources once and split them into train / held-out.

The AdaptiVocab demo corpus: the reST sources shipped in Debian's `python3.11-doc`
package (about 11 MB under usr/share/doc/python3.11/html/_sources/). Run once, outside
the tests (needs apt and the Debian mirror):

    .venv/bin/python benchmarks/data/fetch_python_docs.py

Writes benchmarks/data/python-docs/{train,heldout}.txt (git-ignored). The split is by
file: a source file goes to held-out when the SHA-256 of its relative path falls in the
held-out tenth, so the split is deterministic and no document is in both halves.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
DEFAULT_OUT = Path(__file__).resolve().parent / "python-docs"


def is_heldout(rel_path: str, heldout_percent: int) -> bool:
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def fetch_deb(workdir: Path) -> Path:
    """Download the .deb with apt (the only network access) and return its path."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} produced no .deb in {workdir}")
    return debs[-1]


def split_sources(root: Path, out: Path, heldout_percent: int) -> dict:
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise RuntimeError(f"no documentation sources under {root}")
    parts = {"train": [], "heldout": []}
    for path in files:
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        parts["heldout" if is_heldout(rel, heldout_percent) else "train"].append(text)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, texts in parts.items():
        data = "\n".join(texts)
        (out / f"{name}.txt").write_text(data, encoding="utf-8")
        sizes[name] = (len(texts), len(data.encode("utf-8")))
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--deb", type=Path, help="use this already downloaded .deb instead of apt-get download")
    ap.add_argument("--heldout-percent", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb or fetch_deb(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        sizes = split_sources(tmp / "root" / SOURCES, args.out, args.heldout_percent)
    for name, (n_files, n_bytes) in sizes.items():
        print(f"{name:8s} {n_files:4d} files {n_bytes / 1e6:6.2f} MB -> {args.out / (name + '.txt')}")


if __name__ == "__main__":
    main()
