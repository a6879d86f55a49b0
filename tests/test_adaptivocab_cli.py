"""`python -m adaptivocab` on bad input: one-line errors, no tracebacks, no data lost."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptivocab.__main__ import main
from adaptivocab.outdir import MARKER, staged_output_dir, write_marker
from adaptivocab_testutil import stdlib_file, tiny_llama_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny base model, a corpus, a patch tokenizer and a patched model, made once."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama_dir(root / "base")
    corpus = root / "corpus.txt"
    corpus.write_text(stdlib_file("glob.py").read_text(encoding="utf-8"), encoding="utf-8")
    pt, patched = root / "pt", root / "patched"
    main(["build", "--base", str(base), "--corpus", str(corpus), "--num-new-tokens", "8", "--max-ngram", "3",
          "--out", str(pt)])
    main(["patch-model", "--model", str(base), "--patch-tokenizer", str(pt), "--out", str(patched)])
    return {"root": root, "base": str(base), "corpus": str(corpus), "pt": str(pt), "patched": str(patched)}


def run(argv, capsys):
    """Run the CLI in-process; return (exit code, stderr). An uncaught exception fails the test."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_clean_error(code, err, *fragments):
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and (lines[0].startswith("error: ") or ": error: " in lines[0]), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def snapshot(path: Path) -> dict:
    """Relative path -> content hash of every file under `path` (to show nothing was destroyed)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def user_dir(path: Path) -> Path:
    """A directory of someone's files that no command may delete."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("precious\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return path


def build_args(env, out, *extra, corpus=None, n=8):
    return ["build", "--base", env["base"], "--corpus", *(corpus or [env["corpus"]]), "--num-new-tokens", n,
            "--max-ngram", 3, "--out", out, *extra]


def patch_args(env, out, *extra, pt=None):
    return ["patch-model", "--model", env["base"], "--patch-tokenizer", pt or env["pt"], "--out", out, *extra]


def finetune_args(env, out, *extra, corpus=None):
    return ["finetune", "--model", env["patched"], "--corpus", *(corpus or [env["corpus"]]), "--seq-len", 16,
            "--batch-size", 1, "--max-tokens", 16, "--out", out, *extra]


def evaluate_args(env, out, *extra, corpus=None):
    return ["evaluate", "--base", env["base"], "--patched", env["patched"], "--labels", "p",
            "--corpus", *(corpus or [env["corpus"]]), "--speed", "none", "--max-bytes", 300, "--out", out, *extra]


MAKE_ARGS = {"build": build_args, "patch-model": patch_args, "finetune": finetune_args, "evaluate": evaluate_args}


# ---- 1. data loss: --out . --overwrite and friends --------------------------------------------

def test_patch_model_out_dot_overwrite_keeps_the_current_directory(env, tmp_path):
    """The probe's data-loss case, end to end in a subprocess."""
    cwd = user_dir(tmp_path / "work")
    before = snapshot(cwd)
    proc = subprocess.run([sys.executable, "-m", "adaptivocab", *map(str, patch_args(env, ".", "--overwrite"))],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_clean_error(proc.returncode, proc.stderr, "refusing to replace", "current directory")
    assert snapshot(cwd) == before and sorted(p.name for p in cwd.iterdir()) == ["notes.txt", "sub"]


@pytest.mark.parametrize("command", ["build", "patch-model", "finetune"])
def test_out_dot_overwrite_is_refused_even_when_marked(env, tmp_path, monkeypatch, capsys, command):
    cwd = user_dir(tmp_path / "work")
    write_marker(cwd, "build")  # even an output of ours: it is where the user stands
    before = snapshot(cwd)
    monkeypatch.chdir(cwd)
    args = MAKE_ARGS[command](env, ".", "--overwrite")
    assert_clean_error(*run(args, capsys), "current directory")
    assert snapshot(cwd) == before


def test_overwrite_refuses_unmarked_home_and_input_directories(env, tmp_path, monkeypatch, capsys):
    victim = user_dir(tmp_path / "victim")
    before = snapshot(victim)
    assert_clean_error(*run(patch_args(env, victim, "--overwrite"), capsys), "not written by this project", MARKER)
    assert snapshot(victim) == before

    home = user_dir(tmp_path / "home")
    write_marker(home, "build")
    monkeypatch.setenv("HOME", str(home))
    assert_clean_error(*run(patch_args(env, home, "--overwrite"), capsys), "home directory")
    assert (home / "notes.txt").is_file()

    # A marked directory that holds an input (here the corpus) is not replaced either.
    holder = user_dir(tmp_path / "holder")
    write_marker(holder, "build")
    corpus = holder / "corpus.txt"
    corpus.write_text(Path(env["corpus"]).read_text())
    assert_clean_error(*run(build_args(env, holder, "--overwrite", corpus=[corpus]), capsys), "an input")
    assert_clean_error(*run(finetune_args(env, env["patched"], "--overwrite"), capsys), "an input")
    assert (holder / "notes.txt").is_file() and (Path(env["patched"]) / "model.safetensors").is_file()
    assert_clean_error(*run(patch_args(env, "/", "--overwrite"), capsys), "--out")


def test_overwrite_replaces_only_our_previous_output_without_leftovers(env, tmp_path, capsys):
    out = tmp_path / "patched"
    assert run(patch_args(env, out), capsys)[0] == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "patch-model"
    (out / "stale.txt").write_text("from the old output")
    assert_clean_error(*run(patch_args(env, out), capsys), "already exists", "--overwrite")
    assert (out / "stale.txt").is_file()
    assert run(patch_args(env, out, "--overwrite", "--init", "mean"), capsys)[0] == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["adaptivocab"]["init"] == "mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patched"]  # no temporary or old siblings left


def test_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out, "test") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with staged_output_dir(out, "test", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 2. bad --out, patch_tokenizer.json, sizes -----------------------------------------------

@pytest.mark.parametrize("command", ["build", "patch-model", "finetune", "evaluate"])
@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_bad_out_fails_before_any_work(env, tmp_path, capsys, command, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    out = {"file": a_file, "under-file": a_file / "x", "proc": Path("/proc/adaptivocab-x")}[where]
    if command == "evaluate" and where == "file":
        out = tmp_path / "a_dir"  # evaluate's --out is a file prefix: the bad case is a directory
        out.mkdir()
    args = MAKE_ARGS[command](env, out)
    # With a missing base/model, only a check made before loading anything can report --out.
    args[args.index("--base" if "--base" in args else "--model") + 1] = str(tmp_path / "no-model")
    assert_clean_error(*run(args, capsys), "--out")
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file"], ["a_dir", "a_file"])


def _patch_tokenizer_variants(good: dict) -> dict:
    one = good["ngrams"][0]
    return {
        "list": [], "empty-object": {}, "ngrams-int": {"ngrams": 5},
        "ngrams-not-list": dict(good, ngrams="x"),
        "id-string": dict(good, ngrams=[dict(one, id=str(one["id"]))]),
        "tokens-floats": dict(good, ngrams=[dict(one, tokens=[1.5, 2.5])]),
        "id-out-of-range": dict(good, ngrams=[dict(one, id=10 ** 9)], removed_ids=[10 ** 9]),
        "component-out-of-range": dict(good, ngrams=[dict(one, tokens=[5, -3])], removed_ids=[one["id"]]),
        "duplicate-id": dict(good, ngrams=[one, one]),
        "base-config-list": dict(good, base_config=[1]),
        "base-tokenizer-list": dict(good, base_tokenizer=[]),
        "wrong-version": dict(good, version=99),
    }


def test_bad_patch_tokenizer_json_is_a_clear_error(env, tmp_path, capsys):
    good = json.loads((Path(env["pt"]) / "patch_tokenizer.json").read_text())
    variants = {name: json.dumps(obj) for name, obj in _patch_tokenizer_variants(good).items()}
    variants["truncated"] = json.dumps(good)[:3000]
    variants["not-utf8"] = b"\xff\xfe{}"
    for name, content in variants.items():
        d = tmp_path / name
        d.mkdir()
        f = d / "patch_tokenizer.json"
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        assert_clean_error(*run(patch_args(env, tmp_path / "out", pt=d), capsys), str(f))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,flag,value", [
    ("build", "--num-new-tokens", "0"), ("build", "--num-new-tokens", "-5"), ("build", "--max-ngram", "1"),
    ("build", "--max-ngram", "0"), ("build", "--min-count", "0"),
    ("finetune", "--batch-size", "0"), ("finetune", "--seq-len", "0"), ("finetune", "--max-tokens", "0"),
    ("finetune", "--eval-every", "0"), ("finetune", "--save-every", "0"), ("finetune", "--threads", "0"),
    ("finetune", "--eval-bytes", "0"), ("finetune", "--lr", "0"), ("finetune", "--max-minutes", "-1"),
    ("finetune", "--lr", "nan"), ("finetune", "--batch-size", "x"),
    ("evaluate", "--concurrency", "0"), ("evaluate", "--rounds", "0"), ("evaluate", "--max-bytes", "0"),
    ("evaluate", "--window", "1"), ("evaluate", "--max-tokens", "0"), ("evaluate", "--threads", "0"),
])
def test_non_positive_sizes_are_usage_errors(env, tmp_path, capsys, command, flag, value):
    args = MAKE_ARGS[command](env, tmp_path / "out")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    code, err = run(args, capsys)
    assert code == 2
    assert_clean_error(code, err, f"argument {flag}")
    assert sorted(tmp_path.iterdir()) == []


def test_finetune_bad_train_parts_is_a_clear_error(env, tmp_path, capsys):
    assert_clean_error(*run(finetune_args(env, tmp_path / "ft", "--train", "bogus"), capsys), "--train", "bogus")
    assert not (tmp_path / "ft").exists()


# ---- 3. build --out must not silently overwrite ----------------------------------------------

def test_build_existing_out_is_an_error_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "pt"
    assert run(build_args(env, out, n=4), capsys)[0] == 0
    first = snapshot(out)
    assert json.loads((out / MARKER).read_text())["kind"] == "build"
    assert_clean_error(*run(build_args(env, out, n=6), capsys), "already exists", "--overwrite")
    assert snapshot(out) == first
    assert run(build_args(env, out, "--overwrite", n=6), capsys)[0] == 0
    assert len(json.loads((out / "patch_tokenizer.json").read_text())["ngrams"]) == 6
    mine = user_dir(tmp_path / "mine")
    (mine / "patch_tokenizer.json").write_text("{}")  # looks like ours but has no marker
    assert_clean_error(*run(build_args(env, mine, "--overwrite"), capsys), "not written by this project")
    assert (mine / "notes.txt").is_file()


# ---- 4. nothing to build --------------------------------------------------------------------

def test_build_with_nothing_selected_fails_and_writes_nothing(env, tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\n")
    assert_clean_error(*run(build_args(env, tmp_path / "pt", corpus=[tiny]), capsys), "no n-gram", "min_count")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


# ---- 5. bad corpus files --------------------------------------------------------------------

BAD_CORPORA = {
    "missing": (None, "does not exist"),
    "directory": ("dir", "is a directory"),
    "empty": (b"", "is empty"),
    "blank": (b"  \n\t\n", "is empty"),
    "latin-1": ("café au lait".encode("latin-1"), "not valid UTF-8"),
    "binary": (bytes(range(256)), "not valid UTF-8"),
    "nul-bytes": (b"abc\x00def\n", "binary"),
}


@pytest.mark.parametrize("command", ["build", "finetune", "evaluate"])
@pytest.mark.parametrize("kind", list(BAD_CORPORA))
def test_bad_corpus_file_is_named_in_a_clear_error(env, tmp_path, capsys, command, kind):
    content, message = BAD_CORPORA[kind]
    bad = tmp_path / f"bad-{kind}.txt"
    if content == "dir":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    args = MAKE_ARGS[command](env, tmp_path / "out", corpus=[env["corpus"], bad])
    assert_clean_error(*run(args, capsys), str(bad), message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


def test_finetune_bad_eval_corpus_is_named(env, tmp_path, capsys):
    missing = tmp_path / "heldout.txt"
    assert_clean_error(*run(finetune_args(env, tmp_path / "ft", "--eval-corpus", missing), capsys),
                       "eval corpus file", str(missing))


# ---- extras found while probing ---------------------------------------------------------------

def test_finetune_never_deletes_a_foreign_checkpoint_path(env, tmp_path, capsys):
    foreign = user_dir(tmp_path / "ft.checkpoint")  # where finetune would put its checkpoint
    before = snapshot(foreign)
    assert_clean_error(*run(finetune_args(env, tmp_path / "ft"), capsys), str(foreign), "not an adaptivocab checkpoint")
    assert snapshot(foreign) == before and not (tmp_path / "ft").exists()


def test_symlinked_out_is_refused(env, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(env["patched"], target_is_directory=True)
    assert_clean_error(*run(patch_args(env, link, "--overwrite"), capsys), "symbolic link")
    assert (Path(env["patched"]) / "model.safetensors").is_file()


@pytest.mark.parametrize("name,content,message", [
    ("config.json", b"{bad", "model config"), ("tokenizer.json", b"[1, 2", "tokenizer file"),
    ("tokenizer.json", b"[]", "tokenizer file"), ("model.safetensors", b"garbage", "cannot read weights"),
])
def test_corrupt_model_directory_files_are_named(env, tmp_path, capsys, name, content, message):
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(env["base"]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / name).write_bytes(content)
    args = patch_args(env, tmp_path / "out")
    args[args.index("--model") + 1] = str(model)
    assert_clean_error(*run(args, capsys), message, str(model / name))
    assert not (tmp_path / "out").exists()


def test_teacher_targets_and_distillation_bad_input(env, tmp_path, capsys):
    """teacher-targets / finetune --teacher-targets: each bad input is one error line, nothing half-written."""
    t = ["teacher-targets", "--corpus", env["corpus"], "--seq-len", 16, "--max-blocks", 2]
    code, err = run([*t, "--model", env["base"], "--out", tmp_path / "a"], capsys)
    assert_clean_error(code, err, "not a patched model directory")
    foreign = user_dir(tmp_path / "mine")
    before = snapshot(foreign)
    code, err = run([*t, "--model", env["patched"], "--out", foreign], capsys)
    assert_clean_error(code, err, "not empty")
    assert snapshot(foreign) == before
    code, err = run([*t, "--model", env["patched"], "--out", tmp_path / "b", "--expand", "-1"], capsys)
    assert_clean_error(code, err, "expand_per_position")
    code, err = run([*t, "--model", env["patched"], "--out", tmp_path / "t"], capsys)
    assert code in (0, None), err
    ft = ["finetune", "--model", env["patched"], "--corpus", env["corpus"], "--seq-len", 16, "--batch-size", 2,
          "--max-tokens", 64, "--train", "lm_head"]
    code, err = run([*ft, "--teacher-targets", tmp_path / "nothing", "--out", tmp_path / "ft1"], capsys)
    assert_clean_error(code, err, "holds no teacher targets")
    code, err = run([*ft[:6], 32, *ft[7:], "--teacher-targets", tmp_path / "t", "--out", tmp_path / "ft2"], capsys)
    assert_clean_error(code, err, "seq_len")
    code, err = run([*ft, "--teacher-targets", tmp_path / "t", "--teacher-weight", "1.5", "--out", tmp_path / "ft3"],
                    capsys)
    assert code == 2 and "must be in [0, 1]" in err
    code, err = run([*ft, "--teacher-targets", tmp_path / "t", "--out", tmp_path / "ft4"], capsys)
    assert code in (0, None), err
    assert not (tmp_path / "ft1").exists() and not (tmp_path / "ft2").exists()
