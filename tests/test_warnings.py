"""A normal train / generate / merge prints no warning (issue 18).

Our own code raises no warning and calls no deprecated API: while a short train, generate and merge run on the
tiny model, every warning issued from a qlora_kit module, and every DeprecationWarning/FutureWarning of a name
qlora_kit calls (a library telling us we call a deprecated name), fails the test. The
command line adds what a user sees: no warning line on stderr (the README's train/generate commands are checked
the same way in test_readme.py).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

import qlora_kit

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(Path(qlora_kit.__file__).resolve().parent) + os.sep
# A Python warning as printed on stderr ("file.py:12: FutureWarning: ..."), or bitsandbytes' kernels hint.
WARNING_LINE = re.compile(r"^.*\b\w*Warning: .*$|^.*Failed to load CPU gemm_4bit_forward.*$", re.MULTILINE)


def _ours(path: str) -> bool:
    return str(Path(path).resolve()).startswith(PACKAGE)


@contextlib.contextmanager
def warnings_from_our_code():
    """Collect (as text) each warning issued in qlora_kit, and each deprecation warning of a name qlora_kit calls.

    A warning points at the line its ``stacklevel`` names; a deprecation is ours when that line, or the line that
    called the function holding it (libraries that warn with the default stacklevel=1), is in qlora_kit.
    """
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]  # outermost first
        at = max((i for i, f in enumerate(stack) if f.filename == filename and f.lineno == lineno), default=None)
        caller = stack[at - 1] if at else None
        deprecation = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        if _ours(filename) or (deprecation and caller is not None and _ours(caller.filename)):
            via = f" (called from {caller.filename}:{caller.lineno})" if caller else ""
            found.append(f"{filename}:{lineno}: {category.__name__}: {message}{via}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield found


def test_train_generate_merge_raise_no_warning_from_our_code(tiny_model_dir, tmp_path):
    from qlora_kit.config import load_train_config
    from qlora_kit.inference.generate import generate
    from qlora_kit.merging.pipeline import merge_and_export
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.load import load_model
    from qlora_kit.training.recipe import train

    config = load_train_config(REPO / "docs" / "config.example.yaml", [
        f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4",
        f"data.train_file={REPO / 'docs/examples/train.jsonl'}", f"data.eval_file={REPO / 'docs/examples/eval.jsonl'}",
        f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.batch_size=4",
        "training.eval_every=2", "training.gradient_checkpointing=on"])
    with warnings_from_our_code() as found:
        result = train(config)
        model, tokenizer = load_model(tiny_model_dir, compute_dtype="fp32", device="cpu")
        load_adapter(model, result.adapter_dir)
        generate(model, tokenizer, ["Ana Novak was born on 2 May 1990 in Porto."], max_new_tokens=4)
        del model
        merge_and_export(tiny_model_dir, result.adapter_dir, tmp_path / "merged", dtype="fp32", progress=False)
    assert result.status == "completed"
    assert not found, "warnings from qlora_kit:\n" + "\n".join(found)


def test_cli_merge_prints_no_warning_line(tiny_model_dir, tiny_adapter_dir, tmp_path):
    cmd = [sys.executable, "-m", "qlora_kit", "merge", "--base", str(tiny_model_dir), "--adapter",
           str(tiny_adapter_dir), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          stdin=subprocess.DEVNULL, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not WARNING_LINE.findall(proc.stderr), proc.stderr[-3000:]


# What a user reads as a warning in a command's output: a Python warning or the source line printed under it.
ANY_WARNING = re.compile(r"^.*(Warning|warn\().*$", re.MULTILINE)


@pytest.mark.real_model
def test_train_generate_merge_on_the_demo_model_print_no_warning_line(demo_model_dir, tmp_path):
    """A normal run on the real demo model (a few steps of docs/config.example.yaml, TensorBoard logging on, then
    generate and merge), each a `qlora-kit` subprocess as a user runs it: no warning line on stdout or stderr."""
    run, env = tmp_path / "run", {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [
        ["train", "docs/config.example.yaml", "training.max_steps=3", "training.eval_every=3",
         "training.save_every=3", f"training.output_dir={run}", "training.report_to=[tensorboard]"],
        ["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "24",
         "Convert the record to one CSV line: last_name,first_name,birth_date,city (date as YYYY-MM-DD).\n\n"
         "Ana Novak was born on 2 May 1990 in Porto."],
        ["merge", "--base", "demo", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")],
    ]
    for args in commands:
        proc = subprocess.run([sys.executable, "-m", "qlora_kit", *args], check=False, capture_output=True, text=True,
                              cwd=REPO, env=env, stdin=subprocess.DEVNULL, timeout=3600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"qlora-kit {args[0]} exited {proc.returncode}:\n{output[-3000:]}"
        assert not ANY_WARNING.findall(output), f"qlora-kit {args[0]}: {ANY_WARNING.findall(output)}"
    assert list((run / "tracking").rglob("events.out.tfevents.*"))
