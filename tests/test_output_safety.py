"""Nothing the user owns is ever deleted or overwritten: outputs that collide with an input are refused (CLI,
scripts and Python API, symlinks included), --overwrite replaces only an earlier output of the same kind, and
outputs get the user's normal permissions."""
import importlib.util
import os
import runpy
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import load_tiny

from qlora_kit import LoraConfig, add_lora, merge_and_export, save_adapter
from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.cli import main
from qlora_kit.merging.resize import adapter_resize
from qlora_kit.model.lora import lora_layers
from qlora_kit.paths import OutputPathError, check_output_path
from qlora_kit.training.checkpoint import save_checkpoint

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def pristine(tiny_model_dir, tmp_path_factory):
    """A base model folder and a trained-looking adapter, copied afresh into each test's folder."""
    root = tmp_path_factory.mktemp("pristine")
    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    save_adapter(model, root / "run" / "adapter")
    (root / "run" / "notes.txt").write_text("my notes on this run")
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    (root / "data").mkdir()
    (root / "data" / "eval.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n')
    return root


@pytest.fixture
def w(pristine, tmp_path):
    """This test's copy: models/base, run/adapter (+ run/notes.txt), data/eval.jsonl."""
    for name in ("models", "run", "data"):
        shutil.copytree(pristine / name, tmp_path / name, symlinks=True)
    return tmp_path


def _snapshot(*roots: Path) -> dict:
    """Every file and link under ``roots``: its bytes (or link target), so any change is seen."""
    snap = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            snap[str(p)] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return snap


def _merge_args(w: Path, out, *extra) -> list[str]:
    return ["merge", "--base", str(w / "models" / "base"), "--adapter", str(w / "run" / "adapter"),
            "--out", str(out), "--no-verify", *extra]


def _refused(capsys, rc: int, *words: str) -> str:
    """Exit 2 with exactly one line on stderr that names ``words``; returns the line."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


# ---------------------------------------------------------------------------------------------
# Collisions with an input, through the CLI

COLLISIONS = {  # --out (relative to the test folder) -> the input flag it collides with, and how
    "models/base": ("--base", "is"),
    "models": ("--base", "contains"),
    "models/base/merged": ("--base", "lies inside"),
    "run/adapter": ("--adapter", "is"),
    "run": ("--adapter", "contains"),
    "run/adapter/merged": ("--adapter", "lies inside"),
    "data": ("--eval-file", "contains"),
    "data/eval.jsonl": ("--eval-file", "is"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("out", sorted(COLLISIONS))
def test_merge_out_colliding_with_an_input_is_refused(w, capsys, out, overwrite):
    flag, relation = COLLISIONS[out]
    before = _snapshot(w)
    extra = ["--eval-file", str(w / "data" / "eval.jsonl")] + (["--overwrite"] if overwrite else [])
    line = _refused(capsys, main(_merge_args(w, w / out, *extra)), f"--out {w / out} {relation} the input {flag}",
                    "choose an --out")
    assert "with or without --overwrite" in line
    assert _snapshot(w) == before  # every input byte for byte; nothing new beside them either


@pytest.mark.parametrize("out", ["run/adapter", "run", "run/adapter/small"])
def test_adapter_resize_out_colliding_with_the_adapter_is_refused(w, capsys, out):
    before = _snapshot(w)
    rc = main(["adapter-resize", "--adapter", str(w / "run" / "adapter"), "--out", str(w / out), "--rank", "2",
               "--overwrite"])
    _refused(capsys, rc, f"--out {w / out}", "the input --adapter")
    assert _snapshot(w) == before


def test_rank_sweep_out_and_export_colliding_with_an_input_are_refused_before_loading(w, capsys):
    before = _snapshot(w)
    common = ["rank-sweep", "--adapter", str(w / "run" / "adapter"), "--data", str(w / "data" / "eval.jsonl"),
              "--model", str(w / "models" / "base")]
    _refused(capsys, main([*common, "--export", str(w / "run")]), "--export", "contains the input --adapter")
    _refused(capsys, main([*common, "--out", str(w / "run" / "adapter")]), "--out", "is the input --adapter")
    _refused(capsys, main([*common, "--out", str(w / "models" / "base" / "sweep")]), "lies inside the input --model")
    assert _snapshot(w) == before


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["merge_adapter.py", "export_model.py"])
def test_scripts_refuse_an_out_that_is_the_base(w, capsys, script, monkeypatch):
    before = _snapshot(w)
    args = _merge_args(w, w / "models" / "base", "--overwrite")[1:]
    if script == "merge_adapter.py":  # its __main__ hands sys.argv to the CLI
        monkeypatch.setattr("sys.argv", [script, *args])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
        rc = done.value.code
    else:
        rc = _load_script(script).main(args)
    _refused(capsys, rc, "is the input --base")
    assert _snapshot(w) == before


# ---------------------------------------------------------------------------------------------
# Symlinks, and the Python API


def test_symlinks_to_an_input_are_seen_through(w, capsys):
    links = {"to-base": w / "models" / "base", "to-run": w / "run", "alias": w / "run" / "adapter"}
    for name, target in links.items():
        (w / name).symlink_to(target, target_is_directory=True)
    before = _snapshot(w)
    # --out is a symlink whose target is the base
    _refused(capsys, main(_merge_args(w, w / "to-base", "--overwrite")), "is the input --base")
    # --out does not exist yet but lies inside the base through a symlinked parent
    _refused(capsys, main(_merge_args(w, w / "to-base" / "new", "--overwrite")), "lies inside the input --base")
    # --out is a symlink to the run folder that holds the adapter
    _refused(capsys, main(_merge_args(w, w / "to-run", "--overwrite")), "contains the input --adapter")
    # the adapter is given through a symlink; --out is the real folder that contains its target
    rc = main(["merge", "--base", str(w / "models" / "base"), "--adapter", str(w / "alias"), "--out", str(w / "run"),
               "--overwrite", "--no-verify"])
    _refused(capsys, rc, "contains the input --adapter")
    # a relative path through ".." that lands on the base
    _refused(capsys, main(_merge_args(w, w / "run" / ".." / "models" / "base", "--overwrite")), "--base")
    assert _snapshot(w) == before


def test_python_api_refuses_collisions_before_any_work(w):
    base, adapter, before = w / "models" / "base", w / "run" / "adapter", _snapshot(w)
    for out in (base, w / "models", base / "x", adapter, w / "run", adapter / "x"):
        with pytest.raises(OutputPathError, match="choose an --out"):
            merge_and_export(base, adapter, out, overwrite=True, verify=False, progress=False)
    for out in (adapter, w / "run", adapter / "x"):
        with pytest.raises(OutputPathError, match="the input --adapter"):
            adapter_resize(adapter, out, 2, overwrite=True)
    assert _snapshot(w) == before


def test_check_output_path_accepts_siblings_and_missing_inputs(w):
    base = w / "models" / "base"
    check_output_path(w / "models" / "base-merged", {"--base": base})  # a sibling whose name starts the same
    check_output_path(w / "run" / "merged", {"--adapter": w / "run" / "adapter"})  # beside the adapter
    check_output_path(base, {"--base": None, "--eval-file": w / "missing.jsonl"})  # nothing to lose
    with pytest.raises(OutputPathError, match=r"^--export .* lies inside the input model "):
        check_output_path(base / "a" / "b", {"model": base}, "--export")


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only an earlier output of the same kind


def test_overwrite_never_replaces_a_folder_that_is_not_an_earlier_merge(w, capsys):
    mine = w / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _snapshot(mine, w / "models", w / "run")
    _refused(capsys, main(_merge_args(w, mine, "--overwrite")), f"{mine} exists and is not a previous merge output",
             "merge_report.json", "move or delete it yourself")
    (w / "file-out").write_text("a file")
    _refused(capsys, main(_merge_args(w, w / "file-out", "--overwrite")), "is not a previous merge output")
    (w / "link-out").symlink_to(mine, target_is_directory=True)
    _refused(capsys, main(_merge_args(w, w / "link-out", "--overwrite")), "is not a previous merge output")
    assert _snapshot(mine, w / "models", w / "run") == before
    assert (w / "file-out").read_text() == "a file" and (w / "link-out").is_symlink()
    # an earlier merge output is replaced with --overwrite
    merged = w / "merged"
    assert main(_merge_args(w, merged)) == 0
    (merged / "model.safetensors").write_bytes(b"stale")
    assert main(_merge_args(w, merged, "--overwrite")) == 0
    assert (merged / "model.safetensors").read_bytes() != b"stale"


def test_overwrite_replaces_only_an_earlier_resize_and_save_adapter_only_an_adapter(w, capsys):
    adapter, small = w / "run" / "adapter", w / "small"
    other = w / "other-adapter"
    shutil.copytree(adapter, other)
    before = _snapshot(other)
    rc = main(["adapter-resize", "--adapter", str(adapter), "--out", str(other), "--rank", "2", "--overwrite"])
    _refused(capsys, rc, "is not a previous adapter-resize output", "resize_report.json")
    assert _snapshot(other) == before  # a trained adapter is not a resize output: kept
    adapter_resize(adapter, small, 2)
    assert adapter_resize(adapter, small, 1, overwrite=True)["rank"] == 1

    model, _ = load_tiny(w / "models" / "base")
    add_lora(model, LoraConfig(r=2, alpha=4))
    mine = w / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a previous adapter output.*adapter_config.json"):
        save_adapter(model, mine)
    assert (mine / "keep.txt").read_text() == "mine"
    save_adapter(model, other)  # an adapter folder is replaced by an adapter
    assert '"r": 2' in (other / "adapter_config.json").read_text()


# ---------------------------------------------------------------------------------------------
# Permissions


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def test_outputs_get_the_users_normal_permissions(w):
    for p in (w / "models" / "base").iterdir():
        p.chmod(0o640)  # inputs with their own modes: copies must not inherit them
    old = os.umask(0o002)
    try:
        merge_and_export(w / "models" / "base", w / "run" / "adapter", w / "merged", verify=False, progress=False)
        adapter_resize(w / "run" / "adapter", w / "small", 2)
        model, _ = load_tiny(w / "models" / "base")
        add_lora(model, LoraConfig(r=2, alpha=4))
        save_adapter(model, w / "adapter")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ckpt = save_checkpoint(w / "ckpts", 1, model, opt, {}, keep=2)
        atomic_write_bytes(w / "file.bin", b"x")
    finally:
        os.umask(old)
    expected = {("dir", 0o775), ("file", 0o664)}
    for folder in (w / "merged", w / "small", w / "adapter", ckpt):
        assert _modes(folder) == expected, folder
    assert stat.S_IMODE((w / "file.bin").stat().st_mode) == 0o664
