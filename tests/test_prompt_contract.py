"""The prompt contract: train-text == serve-text token for token, saved with the adapter, kept by the merge."""
import json

import pytest

from qlora_kit.config import DataConfig, load_train_config
from qlora_kit.data import DataError
from qlora_kit.data.contract import apply_contract, load_contract, prompt_contract, save_contract
from qlora_kit.data.templates import TEMPLATES
from qlora_kit.data.tokenize import tokenize_example
from qlora_kit.testing.tiny import build_tokenizer, make_tiny_model

RECORD = {"instruction": "Spell tiger in capitals.", "input": "please", "output": "TIGER"}
USER = [{"role": "user", "content": "Spell tiger in capitals.\n\nplease"}]  # what a server gets: no system turn


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer has no chat template and puts BOS before plain text."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


def _prompt_ids(ex) -> list[int]:
    """The tokens before the first supervised one: the prompt the model was trained to answer."""
    first = next(i for i, y in enumerate(ex.labels) if y != -100)
    return ex.input_ids[:first]


def _serve_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat-template", "template-less"])
@pytest.mark.parametrize("system", ["", "Answer in capitals only."], ids=["no-system", "system"])
def test_train_text_equals_serve_text_from_a_fresh_tokenizer(tmp_path, chat_template, system):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    build_tokenizer(chat_template=chat_template).save_pretrained(base)
    trained = AutoTokenizer.from_pretrained(base)
    ex = tokenize_example(RECORD, "alpaca", trained, DataConfig(system_prompt=system), "mem")
    (tmp_path / "adapter").mkdir()
    save_contract(trained, tmp_path / "adapter", base)
    adapter_files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert adapter_files == ["chat_template.jinja", "prompt_contract.json"]  # no tokenizer copy: none was added
    # plain transformers: the base's tokenizer with the adapter's template renders the trained prompt exactly
    template = (tmp_path / "adapter" / "chat_template.jinja").read_text()
    fresh = AutoTokenizer.from_pretrained(base, chat_template=template)
    assert _serve_ids(fresh, USER) == _prompt_ids(ex)
    # and so does our loader on a tokenizer that never saw the data
    other = AutoTokenizer.from_pretrained(base)
    contract = apply_contract(other, tmp_path / "adapter")
    assert _serve_ids(other, USER) == _prompt_ids(ex)
    assert contract.system_prompt == system and contract.template == ("tokenizer" if chat_template else "alpaca")
    if not chat_template:  # BOS first, as the template-less tokenizer puts it before plain text
        assert contract.add_bos and _prompt_ids(ex)[0] == fresh.bos_token_id
        assert ex.input_ids[-1] == fresh.eos_token_id and ex.labels[-1] == fresh.eos_token_id


def test_chat_records_get_the_system_prompt_of_the_contract_too():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = tokenize_example({"messages": msgs}, "chat", tok, DataConfig(system_prompt="Be brief."), "mem")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_is_prefix_stable_and_serves_the_trained_prompt(name):
    tok = build_tokenizer(chat_template=False)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ex = tokenize_example({"messages": msgs}, "chat", tok, DataConfig(chat_template=name), "mem")
    assert _prompt_ids(ex) == _serve_ids(tok, msgs[:1])
    supervised = [y for y in ex.labels if y != -100]
    assert tok.decode(supervised).startswith("b") and "d" in tok.decode(supervised)
    assert supervised[-1] == tok.eos_token_id  # the last reply ends with a trained EOS


def test_unknown_template_names_the_choices_and_a_jinja_file_works(tmp_path):
    tok = build_tokenizer(chat_template=False)
    with pytest.raises(DataError, match=r"data.chat_template: 'vicuna' .*alpaca, chatml, llama3, completion, auto"):
        prompt_contract(tok, DataConfig(chat_template="vicuna"))
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    ex = tokenize_example(RECORD, "alpaca", tok, DataConfig(chat_template=str(jinja)), "mem")
    assert tok.decode(_prompt_ids(ex)) == "<|im_start|>[user] Spell tiger in capitals.\n\nplease\n[assistant] "


def test_added_tokens_keep_the_full_tokenizer_beside_the_adapter(tmp_path):
    base = tmp_path / "base"
    build_tokenizer().save_pretrained(base)
    tok = build_tokenizer()
    tok.add_tokens(["<tool>"])
    prompt_contract(tok, DataConfig())
    (tmp_path / "adapter").mkdir()
    save_contract(tok, tmp_path / "adapter", base)
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    assert load_contract(tmp_path / "adapter").chat_template == tok.chat_template


def _toy_data(path, n=24):
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon"]
    rows = [{"instruction": f"Spell {words[i % 6]} in capitals.", "output": words[i % 6].upper()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_template_less_model_train_validate_merge_keeps_the_contract(tmp_path, plain_model_dir, caplog):
    from transformers import AutoTokenizer

    from qlora_kit.merging.pipeline import merge_and_export
    from qlora_kit.training.recipe import train
    from qlora_kit.training.validate import validate_run

    data = _toy_data(tmp_path / "toy.jsonl")
    config = load_train_config(None, [
        f"model.path={plain_model_dir}", f"data.train_file={data}", "data.eval_fraction=0.25", "data.max_seq_len=64",
        "data.system_prompt=Capitals.", "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4", "lora.alpha=8",
        f"training.output_dir={tmp_path / 'run'}", "training.batch_size=4", "training.optimizer=adamw",
        "training.max_steps=2", "training.save_every=1", "training.gradient_checkpointing=off"])
    summary = validate_run(config).summary()
    assert "prompt: the alpaca template (data.chat_template=auto; the tokenizer has none), BOS first" in summary
    with caplog.at_level("INFO", logger="qlora_kit"):
        result = train(config, progress=False)
    assert any("the alpaca template" in r.getMessage() for r in caplog.records)
    adapter = result.adapter_dir
    assert not (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()
    assert (tmp_path / "run" / "best_adapter" / "prompt_contract.json").is_file()
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():  # resume reads the tokenizer from the base
        assert not any((ckpt / f).exists() for f in ("tokenizer.json", "chat_template.jinja"))
    trained = tokenize_example(RECORD, "alpaca", AutoTokenizer.from_pretrained(plain_model_dir),
                               DataConfig(system_prompt="Capitals."), "mem")

    report = merge_and_export(plain_model_dir, adapter, tmp_path / "merged", dtype="fp32", progress=False,
                              eval_file=data)
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")  # plain transformers
    assert _serve_ids(merged_tok, USER) == _prompt_ids(trained)
    assert load_contract(tmp_path / "merged").template == "alpaca"
    verification = report["verification"]
    assert verification["passed"]

    from qlora_kit.cli import main  # qlora-kit eval --adapter prompts with the adapter's contract too
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--model", str(plain_model_dir), "--adapter", str(adapter), "--data", str(data),
                 "--max-new-tokens", "2", "--out", str(preds), "--compute-dtype", "fp32"]) == 0
    first = json.loads(preds.read_text().splitlines()[0])
    record = json.loads(data.read_text().splitlines()[0])
    trained_first = tokenize_example(record, "alpaca", AutoTokenizer.from_pretrained(plain_model_dir),
                                     DataConfig(system_prompt="Capitals."), "mem")
    assert merged_tok(first["prompt"], add_special_tokens=False).input_ids == _prompt_ids(trained_first)
    assert verification["prompts"][0] == ("<|im_start|>Capitals.\n\n### Instruction:\nSpell apple in capitals."
                                          "\n\n### Response:\n")
