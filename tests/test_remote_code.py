"""A checkpoint whose model or tokenizer needs its own code (auto_map) is refused in one line unless trusted."""
from __future__ import annotations

import json
import shutil

import pytest

from qlora_kit.cli import main
from qlora_kit.config import ConfigError, load_train_config
from qlora_kit.model.load import load_model
from qlora_kit.model.remote_code import check_remote_code
from qlora_kit.training.validate import validate_run


def _evil_folder(source, tmp_path, file, edit):
    """A copy of ``source`` with ``edit`` applied to its ``file``, plus evil.py that would write a marker."""
    folder = shutil.copytree(source, tmp_path / "evil")
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w')\n")
    data = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps(edit(data)))
    return folder


CASES = {
    "config.json": lambda c: {**c, "model_type": "evil_lm", "architectures": ["EvilForCausalLM"],
                              "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}},
    "tokenizer_config.json": lambda c: {**c, "tokenizer_class": "EvilTokenizer",
                                        "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}},
}


@pytest.mark.parametrize("file", sorted(CASES))
def test_custom_code_is_refused_in_one_line_by_validate_and_every_loader(tiny_model_dir, tiny_adapter_dir, tmp_path,
                                                                        capsys, file):
    folder = _evil_folder(tiny_model_dir, tmp_path, file, CASES[file])
    expected = f"{folder / file}: auto_map asks to run custom code (evil.Evil"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    config = load_train_config(None, [f"model.path={folder}", f"data.train_file={data}",
                                      f"training.output_dir={tmp_path / 'run'}"])
    for load in (lambda: validate_run(config), lambda: load_model(folder, device="cpu")):
        with pytest.raises(ConfigError) as e:
            load()
        assert str(e.value).startswith(expected) and str(e.value).endswith("set model.trust_remote_code: true if "
                                                                           "you trust it")
    commands = [["generate", "--model", str(folder), "hi"], ["validate", f"model.path={folder}",
                                                             f"data.train_file={data}"],
                ["merge", "--base", str(folder), "--adapter", str(tiny_adapter_dir), "--out", str(tmp_path / "out")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}") and err.count("\n") == 1
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()
    check_remote_code(folder, trust_remote_code=True)  # trusted: no refusal (transformers then runs the code)


def test_merge_refuses_a_custom_tokenizer_saved_beside_the_adapter(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    adapter = shutil.copytree(tiny_adapter_dir, tmp_path / "adapter")
    shutil.copy(tiny_model_dir / "tokenizer_config.json", adapter)
    _evil_folder(adapter, tmp_path, "tokenizer_config.json", CASES["tokenizer_config.json"])
    shutil.rmtree(adapter)
    (tmp_path / "evil").rename(adapter)
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--no-verify"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {adapter / 'tokenizer_config.json'}: auto_map asks")
    assert not (tmp_path / "out").exists()
