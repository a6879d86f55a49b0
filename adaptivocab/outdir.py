"""Safe outputs for every command of this project that writes a directory or result files.

The one implementation: `adaptivocab` (build, patch-model, finetune), `sarathi quantize`,
`sarathi lora train|merge` and the benchmarks all use it. It lives here because `adaptivocab`
may not import `sarathi` while `sarathi` may import `adaptivocab`; it needs nothing but the
standard library.

The rules:
- `~` is expanded; the path is made absolute before anything else.
- A directory is written into a fresh temporary sibling and renamed into place only when it is
  complete, so a failure never leaves a half-written or mixed directory.
- Each directory written holds MARKER, JSON naming this project and a format version. Its content
  is validated (a marker holding `{}` or another tool's name does not count).
- `--overwrite` replaces only a directory carrying a valid marker (or an empty one), and never
  `/`, the current directory, the home directory, an input, or a directory that is or contains
  an input (a parent of the input model, say), even when marked.
- Result files (benchmarks) are written to a temporary sibling and renamed; a directory in the
  way or an unwritable parent is an error before any work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

PathLike = Union[str, Path]
TOOL = "sarathi-vattn"
FORMAT_VERSION = 1
MARKER = ".sarathi-vattn-output.json"
# Outputs written before the marker was shared: the same rules, their own field names.
LEGACY_MARKER = ".adaptivocab-output.json"
MAX_MARKER_BYTES = 4096


def output_path(path: PathLike, what: str = "--out") -> Path:
    """`path` with `~` expanded, made absolute (not resolved: a link stays visible)."""
    text = os.fspath(path)
    if not text or "\x00" in text:
        raise ValueError(f"{what} {text!r} is not a usable path")
    return Path(os.path.abspath(os.path.expanduser(text)))


def _read_marker(path: Path) -> Optional[dict]:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MARKER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_kind(path: PathLike) -> Optional[str]:
    """The `kind` recorded by a valid marker of ours in directory `path`, else None."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return None
    except OSError:
        return None
    data = _read_marker(path / MARKER)
    version = None if data is None else data.get("format_version")
    if data is not None and data.get("tool") == TOOL and type(version) is int and version == FORMAT_VERSION:
        kind = data.get("kind")
        return kind if isinstance(kind, str) and kind else None
    data = _read_marker(path / LEGACY_MARKER)
    if data is not None and data.get("written_by") == "adaptivocab":
        kind = data.get("kind")
        return kind if isinstance(kind, str) and kind else None
    return None


def is_our_output(path: PathLike) -> bool:
    """True when `path` is a real directory (not a link) holding a valid marker of this project."""
    return marker_kind(path) is not None


def write_marker(directory: PathLike, kind: str) -> None:
    """Mark `directory` as written by this project (`kind`: quantize, lora-merge, build, ...)."""
    (Path(directory) / MARKER).write_text(
        json.dumps({"tool": TOOL, "format_version": FORMAT_VERSION, "kind": kind}) + "\n", encoding="utf-8")


def check_parent_writable(path: PathLike, what: str = "--out") -> Path:
    """Absolute `path` after checking that its directory exists or can be created, and is writable.

    Called before any expensive work, so a bad path fails in a second instead of after a build.
    """
    path = output_path(path, what)
    if not path.name:
        raise ValueError(f"{what} {str(path)!r} is not a usable output path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    # access() says yes to root almost everywhere (e.g. /proc), so really try to create something.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sarathi-probe-", dir=ancestor))
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r}: cannot write in {str(ancestor)!r} ({e.strerror or e})") from None
    return path


def _protected(out: Path, inputs: Sequence[PathLike]) -> Optional[str]:
    """Why `out` may never be replaced, or None."""
    real = out.resolve()
    if real == Path(real.anchor):
        return "it is the root directory"
    guarded = [("the current directory", Path.cwd()), ("your home directory", Path.home())]
    guarded += [("an input", output_path(i, "input")) for i in inputs]
    for name, p in guarded:
        p = p.resolve()
        if real == p or real in p.parents:
            return f"it is or contains {name} ({str(p)!r})"
    return None


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
    reason = _protected(out, inputs)
    if reason:
        raise ValueError(f"refusing to replace {str(out)!r}: {reason}")
    if not overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    if not is_our_output(out) and any(out.iterdir()):
        raise ValueError(f"refusing to replace {str(out)!r}: it was not written by this project (no valid "
                         f"{MARKER}); delete it yourself or choose another --out")
    return out


@contextmanager
def staged_output_dir(out: PathLike, kind: str, overwrite: bool = False,
                      inputs: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a new temporary sibling of `out` to write into; on success it replaces `out`.

    On an exception the temporary directory is removed and `out` is left as it was. An
    existing `out` is replaced only under the rules of `check_output_dir` (checked again
    here, since a long run may have started long ago): old renamed aside, new renamed in,
    old deleted. The new directory never holds a file of the old one.
    """
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        write_marker(tmp, kind)  # first: the temporary directory is ours, so it may be removed
        yield tmp
        _swap_into_place(tmp, check_output_dir(out, overwrite, inputs))
    finally:
        if is_our_output(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def working_output_dir(out: PathLike, kind: str, inputs: Sequence[PathLike] = ()) -> Path:
    """A directory a resumable command keeps writing into (checkpoints), created marked.

    A new `out` is made as a marked temporary sibling renamed into place; an existing one is
    used only when an earlier run of the same `kind` wrote it (so a run resumes), never
    when it is someone else's directory or a protected one.
    """
    out = check_parent_writable(out)
    if out.is_symlink():
        raise ValueError(f"--out {str(out)!r} is a symbolic link; give the real directory")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {str(out)!r} exists and is not a directory")
        reason = _protected(out, inputs)
        if reason:
            raise ValueError(f"refusing to write into {str(out)!r}: {reason}")
        if marker_kind(out) != kind:
            raise ValueError(f"refusing to write into {str(out)!r}: it exists and was not written by an earlier "
                             f"'{kind}' run (no valid {MARKER}); choose another --out")
        return out
    with staged_output_dir(out, kind, inputs=inputs):
        pass
    return out


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
    if is_our_output(old) or not any(old.iterdir()):  # checked before; never delete anything unmarked
        shutil.rmtree(old, ignore_errors=True)


def check_result_prefix(out: PathLike, suffixes: Sequence[str] = (".json", ".png"), what: str = "--out") -> Path:
    """Absolute `out` (a prefix: `<out>.json`, `<out>.png`, ...) after checking it can be written."""
    out = check_parent_writable(out, what)
    for path in [out] + [out.with_suffix(s) for s in suffixes]:
        if path.is_dir():
            raise ValueError(f"{what} {str(out)!r}: {str(path)!r} is a directory")
    return out


def write_result_file(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write a result file atomically (temporary sibling, then rename); a directory in the way is an error."""
    path = output_path(path, "result file")
    if path.is_dir():
        raise ValueError(f"result file {str(path)!r} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
