"""The run folder is recognisably ours; the user's files are never deleted; a finished run is never re-trained by accident."""
import json

import pytest

import qlora_kit.training.setup as train_mod
from qlora_kit.cli import main
from qlora_kit.config import ConfigError, load_train_config
from qlora_kit.training.recipe import train
from qlora_kit.training.run_folder import MARKER

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]


def _overrides(folder, model_dir):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n" for w in WORDS * 2))
    return [f"model.path={model_dir}", f"data.train_file={data}", "data.max_seq_len=64", "model.compute_dtype=fp32",
            "model.device=cpu", "lora.r=4", "lora.alpha=8", f"training.output_dir={folder / 'run'}",
            "training.max_steps=2", "training.batch_size=4", "training.optimizer=adamw", "training.lr=5e-3",
            "training.gradient_checkpointing=off"]


def _user_folder(run):
    """A folder the user owns, holding names a run would write."""
    (run / "adapter").mkdir(parents=True)
    files = {"config.yaml": b"my: own config\n", "metrics.jsonl": b"{\"mine\": 1}\n", "summary.json": b"{}\n",
             "adapter/notes.txt": b"keep me", "unrelated.txt": b"hello"}
    for name, data in files.items():
        (run / name).write_bytes(data)
    return files


def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_mod, "load_model", refuse)


def test_a_non_empty_folder_that_is_not_a_run_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    files = _user_folder(tmp_path / "run")
    _no_model_load(monkeypatch)
    assert main(["train", *_overrides(tmp_path, tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty and holds no qlora-kit run" in err and "--overwrite" in err
    assert all((tmp_path / "run" / n).read_bytes() == b for n, b in files.items())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter", "config.yaml", "metrics.jsonl",
                                                                   "summary.json", "unrelated.txt"]


def test_overwrite_into_a_user_folder_moves_what_it_would_replace_aside(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    files = _user_folder(run)
    config = load_train_config(None, _overrides(tmp_path, tiny_model_dir))
    result = train(config, progress=False, overwrite=True)
    assert result.status == "completed" and (run / MARKER).is_file()
    for name, data in files.items():  # every byte the user had is still there, under its name or set aside
        top, _, rest = name.partition("/")
        kept = run / name if name == "unrelated.txt" else run / f"{top}.before-qlora-kit" / rest if rest else \
            run / f"{name}.before-qlora-kit"
        assert kept.read_bytes() == data, name
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and "model" in (run / "config.yaml").read_text()


def test_a_finished_run_is_never_silently_trained_over(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    overrides = _overrides(tmp_path, tiny_model_dir)
    first = train(load_train_config(None, overrides), progress=False)
    assert first.status == "completed"
    (run / "adapter" / "notes.txt").write_text("my notes about this adapter")
    before = {p: p.read_bytes() for p in (run / "adapter").iterdir()}

    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(ConfigError, match="holds a finished run .*completed, 2 steps.*--overwrite"):
            train(load_train_config(None, overrides), progress=False)
        again = train(load_train_config(None, overrides), resume=True, progress=False)  # nothing left to do
    assert again.status == "completed" and again.steps == 2 and again.adapter_dir == run / "adapter"
    assert {p: p.read_bytes() for p in (run / "adapter").iterdir()} == before

    redo = train(load_train_config(None, overrides + ["training.max_steps=3"]), progress=False, overwrite=True)
    assert redo.steps == 3 and [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == \
        ["step-000003"]
    assert (run / "adapter" / "notes.txt").read_text() == "my notes about this adapter"  # replaced adapter/ kept it
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != before[run / "adapter" / "adapter_model.safetensors"]
