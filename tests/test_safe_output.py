"""One safe-output helper (adaptivocab/outdir.py) under every CLI that writes a directory:
`sarathi quantize`, `sarathi lora train|merge`, `adaptivocab build|patch-model|finetune`.

The probe's data-loss findings, each as a regression test: --overwrite on the home directory, on the
current directory given as an absolute path, on a parent of the input model; `--out "~"`; a marker
holding `{}`; merge --overwrite mixing old and new files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from adaptivocab.outdir import (LEGACY_MARKER, MARKER, check_output_dir, is_our_output, staged_output_dir,
                                write_marker, write_result_file)
from sarathi.lora_training.__main__ import main as lora_main
from sarathi.quantize.__main__ import main as quantize_main


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("precious\n")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return path


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---- the helper itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["{}", "", "not json", "[]", '{"tool": "sarathi-vattn"}',
                                     '{"tool": "other", "format_version": 1, "kind": "quantize"}',
                                     '{"tool": "sarathi-vattn", "format_version": 2, "kind": "quantize"}',
                                     '{"tool": "sarathi-vattn", "format_version": 1, "kind": ""}',
                                     '{"tool": "sarathi-vattn", "format_version": true, "kind": "x"}',
                                     '{"written_by": "adaptivocab"}'])
def test_a_marker_must_be_valid_not_just_present(tmp_path, content):
    d = user_dir(tmp_path / "d")
    (d / MARKER).write_text(content)
    (d / LEGACY_MARKER).write_text(content)
    assert not is_our_output(d)
    with pytest.raises(ValueError, match="not written by this project"):
        check_output_dir(d, overwrite=True)
    assert (d / "notes.txt").is_file()


def test_valid_markers_new_and_legacy(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    write_marker(new, "quantize")
    assert json.loads((new / MARKER).read_text()) == {"tool": "sarathi-vattn", "format_version": 1, "kind": "quantize"}
    (old / LEGACY_MARKER).write_text('{"written_by": "adaptivocab", "kind": "build"}')
    assert is_our_output(new) and is_our_output(old)
    link = tmp_path / "link"
    link.symlink_to(new)
    assert not is_our_output(link)


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with staged_output_dir("~/out", "test") as tmp:
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "home" / "out" / "x.txt").is_file()
    assert not (tmp_path / "~").exists()


def test_root_home_and_cwd_are_never_replaced(tmp_path, monkeypatch):
    home = user_dir(tmp_path / "home")
    write_marker(home, "quantize")  # even marked
    monkeypatch.setenv("HOME", str(home))
    for path, why in (("/", "not a usable output path"), (home, "home directory"), ("~", "home directory")):
        with pytest.raises(ValueError, match=why):
            check_output_dir(path, overwrite=True)
    monkeypatch.chdir(home / "sub")
    write_marker(home / "sub", "quantize")
    with pytest.raises(ValueError, match="current directory"):
        check_output_dir(str(home / "sub"), overwrite=True)
    with pytest.raises(ValueError, match="current directory"):
        check_output_dir(home, overwrite=True, inputs=())  # a parent of the current directory


def test_result_files_are_written_atomically(tmp_path):
    path = write_result_file(tmp_path / "r" / "out.json", '{"a": 1}')
    assert path.read_text() == '{"a": 1}' and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        write_result_file(tmp_path / "d.json", "x")


# ---- sarathi quantize ----------------------------------------------------------------------------

def _quantize(model, out, *extra):
    return quantize_main(["--model", str(model), "--method", "rtn", "--group-size", "32", "--out", str(out),
                          "--quiet", *map(str, extra)])


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """The tiny model inside a user's project directory (which also holds other files)."""
    import shutil

    project = user_dir(tmp_path / "project")
    shutil.copytree(tiny_model_dir, project / "model")
    return project / "model"


def test_quantize_overwrite_refuses_home_cwd_and_parent_of_the_model(model_copy, tmp_path, monkeypatch, capsys):
    home = user_dir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    before_home = snapshot(home)
    assert _quantize(model_copy, home, "--overwrite") == 2
    assert "home directory" in one_error_line(capsys.readouterr().err)
    assert snapshot(home) == before_home

    cwd = user_dir(tmp_path / "cwd")
    monkeypatch.chdir(cwd)
    before_cwd = snapshot(cwd)
    assert _quantize(model_copy, str(cwd.resolve()), "--overwrite") == 2  # the current directory, absolute
    assert "current directory" in one_error_line(capsys.readouterr().err)
    assert snapshot(cwd) == before_cwd

    project = model_copy.parent
    write_marker(project, "quantize")  # even a marked parent holds the input
    before_project = snapshot(project)
    assert _quantize(model_copy, project, "--overwrite") == 2
    assert "an input" in one_error_line(capsys.readouterr().err)
    assert _quantize(model_copy, model_copy, "--overwrite") == 2
    assert "an input" in one_error_line(capsys.readouterr().err)
    assert snapshot(project) == before_project


def test_quantize_tilde_and_empty_marker(model_copy, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert _quantize(model_copy, "~/q") == 0
    assert (home / "q" / "model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert json.loads((home / "q" / MARKER).read_text())["kind"] == "quantize"

    fake = user_dir(tmp_path / "fake")
    (fake / MARKER).write_text("{}")
    assert _quantize(model_copy, fake, "--overwrite") == 2
    assert "not written by this project" in one_error_line(capsys.readouterr().err)
    assert (fake / "notes.txt").is_file()

    (home / "q" / "stale.txt").write_text("old")
    assert _quantize(model_copy, "~/q", "--overwrite") == 0  # our own output: replaced whole
    assert not (home / "q" / "stale.txt").exists()
    assert sorted(p.name for p in home.iterdir()) == ["q"]  # no temporary left beside it


# ---- sarathi lora merge / train ------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from lora_testutil import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "adapter", seed=0, r=4, alpha=8)


def _merge(base, adapter, out, *extra):
    return lora_main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra])


def test_merge_overwrite_never_mixes_old_and_new_files(tiny_model_dir, adapter, tmp_path, capsys):
    out = user_dir(tmp_path / "merged")  # someone's non-empty directory
    before = snapshot(out)
    assert _merge(tiny_model_dir, adapter, out) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)
    assert _merge(tiny_model_dir, adapter, out, "--overwrite") == 2
    assert "not written by this project" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before

    mine = tmp_path / "mine"
    assert _merge(tiny_model_dir, adapter, mine) == 0
    first = snapshot(mine)
    (mine / "stale.safetensors").write_bytes(b"old shard")
    assert _merge(tiny_model_dir, adapter, mine, "--overwrite") == 0
    assert snapshot(mine) == first  # exactly the new files, nothing of the old output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]


def test_merge_refuses_parent_of_the_adapter_home_and_cwd(tiny_model_dir, adapter, tmp_path, monkeypatch, capsys):
    import shutil

    holder = user_dir(tmp_path / "holder")
    shutil.copytree(adapter, holder / "adapter")
    write_marker(holder, "lora-merge")
    before = snapshot(holder)
    assert _merge(tiny_model_dir, holder / "adapter", holder, "--overwrite") == 2
    assert "an input" in one_error_line(capsys.readouterr().err)
    home = user_dir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    assert _merge(tiny_model_dir, adapter, "~", "--overwrite") == 2
    assert "home directory" in one_error_line(capsys.readouterr().err)
    monkeypatch.chdir(holder / "sub")
    assert _merge(tiny_model_dir, adapter, str((holder / "sub").resolve()), "--overwrite") == 2
    assert "current directory" in one_error_line(capsys.readouterr().err)
    assert snapshot(holder) == before and (home / "notes.txt").is_file()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"example number {i} of a small training set"}) + "\n"
                            for i in range(8)))
    return path


def test_train_refuses_a_directory_it_did_not_write(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    out = user_dir(tmp_path / "someone")
    before = snapshot(out)
    assert lora_main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert "not written by an earlier 'lora-train' run" in one_error_line(capsys.readouterr().err)
    (out / MARKER).write_text("{}")
    assert lora_main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert "lora-train" in one_error_line(capsys.readouterr().err)
    (out / MARKER).unlink()
    assert snapshot(out) == before
    monkeypatch.setenv("HOME", str(out))
    assert lora_main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", "~"]) == 2
    assert "home directory" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


@pytest.mark.parametrize("rows,needle", [
    ([{"txt": "a"}], "example 1: expected a 'text', 'prompt'/'completion' or 'messages' field"),
    ([{"text": "fine"}, {"text": 5}], "example 2: text must be a non-empty string"),
    ([{"prompt": "p", "completion": None}], "example 1: prompt and completion must both be strings"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "needs an assistant turn"),
    ([{"text": "only one valid example here"}], "1 valid example(s), too few to hold 1 out"),
])
def test_train_names_the_invalid_example(tiny_model_dir, tmp_path, capsys, rows, needle):
    """Not "too few examples" when an example is invalid: the error says which and why."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert lora_main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing is created before the data is known to be valid
