"""Output directories that are checked early, written aside and swapped into place.

Every command writes into a temporary sibling of `--out` and renames it into place only
when it is complete, so a failure never leaves a half-written directory. Each directory we
write holds a marker file (MARKER) naming what wrote it; `--overwrite` replaces only such a
directory, and never the current directory, `/`, the home directory or a directory that
holds one of the command's inputs, so a mistyped `--out` cannot delete user data.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

PathLike = Union[str, Path]
MARKER = ".adaptivocab-output.json"


def is_our_output(path: PathLike) -> bool:
    """True when `path` is a real directory (not a link) holding our marker file."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def write_marker(directory: PathLike, kind: str) -> None:
    """Mark `directory` as written by adaptivocab (`kind`: build, patch-model, finetune, ...)."""
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "adaptivocab", "kind": kind}) + "\n",
                                          encoding="utf-8")


def check_parent_writable(path: PathLike, what: str = "--out") -> Path:
    """Absolute `path` after checking that its directory exists or can be created, and is writable.

    Called before any expensive work, so a bad path fails in a second instead of after a build.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.name:
        raise ValueError(f"{what} {str(path)!r} is not a usable output path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    # access() says yes to root almost everywhere (e.g. /proc), so really try to create something.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".adaptivocab-probe-", dir=ancestor))
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r}: cannot write in {str(ancestor)!r} ({e.strerror or e})") from None
    return path


def check_output_dir(out: PathLike, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Path:
    """Absolute `out` after checking that it can be (re)written; raises ValueError otherwise.

    `inputs` are the command's source files and directories: `out` may not be one of them
    or contain one, since replacing it would delete them.
    """
    out = check_parent_writable(out)
    if out.is_symlink():
        raise ValueError(f"--out {str(out)!r} is a symbolic link; give the real directory")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if not overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    _check_not_protected(out, inputs)
    if not is_our_output(out):
        raise ValueError(f"refusing to replace {str(out)!r}: it was not written by adaptivocab (no {MARKER}); "
                         f"delete it yourself or choose another --out")
    return out


def _check_not_protected(out: Path, inputs: Sequence[PathLike]) -> None:
    real = out.resolve()
    guarded = [("the current directory", Path.cwd()), ("your home directory", Path.home())]
    guarded += [("an input", Path(i).expanduser()) for i in inputs]
    for name, p in guarded:
        p = p.resolve()
        if real == p or real in p.parents:
            raise ValueError(f"refusing to replace {str(out)!r}: it is or contains {name} ({str(p)!r})")


@contextmanager
def staged_output_dir(out: PathLike, kind: str, overwrite: bool = False,
                      inputs: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a new temporary sibling of `out` to write into; on success it replaces `out`.

    On an exception the temporary directory is removed and `out` is left as it was. An
    existing `out` is replaced only under the rules of `check_output_dir` (checked again
    here, since a long run may have started long ago): old renamed aside, new renamed in,
    old deleted.
    """
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        write_marker(tmp, kind)  # first: the temporary directory is ours, so it may be removed
        yield tmp
        _swap_into_place(tmp, check_output_dir(out, overwrite, inputs))
    finally:
        if is_our_output(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, out: Path) -> None:
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if is_our_output(old):  # it was checked before; never delete anything unmarked
        shutil.rmtree(old, ignore_errors=True)
