"""Preference data (data/preference.py): record forms, response-only masks, file types, errors, split, cache."""
import json

import pytest

from qlora_kit.config import ConfigError, DataConfig, TrainConfig
from qlora_kit.data import DataError
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.formats import detect_format
from qlora_kit.data.preference import PreferenceExample
from qlora_kit.data.prepare import prepare_data
from qlora_kit.data.tokenize import tokenize_example
from qlora_kit.testing.tiny import build_tokenizer
from qlora_kit.training.validate import check_objective


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def plain_tok():  # per test: the prompt contract gives a template-less tokenizer its template when first used
    t = build_tokenizer()
    t.chat_template = None
    return t


def _supervised(tok, ex) -> str:
    assert all(y == i for i, y in zip(ex.input_ids, ex.labels) if y != -100)
    return tok.decode([y for y in ex.labels if y != -100])


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _pairs(tok, records, **cfg):
    train, _, _ = prepare_data(DataConfig(**cfg), tok, records=records)
    assert all(isinstance(p, PreferenceExample) for p in train)
    return train


# --------------------------------------------------------------------------- forms and masks

def test_string_pair_renders_as_prompt_completion_and_trains_only_the_responses(tok):
    [pair] = _pairs(tok, [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}], system_prompt="Be brief.")
    for side, answer in ((pair.chosen, "4"), (pair.rejected, "5")):
        sft = tokenize_example({"prompt": "2+2=", "completion": answer}, "prompt_completion", tok,
                               DataConfig(system_prompt="Be brief."), "r")
        assert side == sft  # the same rendering, tokens and mask as SFT
        assert _supervised(tok, side) == f"{answer}<|im_end|>"


def test_chat_pairs_take_the_shared_messages_as_prompt(tok):
    history = [_user("x"), _bot("y"), _user("z")]
    forms = [
        {"chosen": history + [_bot("good")], "rejected": history + [_bot("bad")]},
        {"prompt": history, "chosen": "good", "rejected": "bad"},
        {"prompt": history, "chosen": [_bot("good")], "rejected": [_bot("bad")]},
    ]
    got = [_pairs(tok, [f])[0] for f in forms]
    assert got[0] == got[1] == got[2]
    assert _supervised(tok, got[0].chosen) == "good<|im_end|>"  # the earlier assistant turn "y" is context
    assert _supervised(tok, got[0].rejected) == "bad<|im_end|>"
    prompt_len = len(tok.apply_chat_template(history, add_generation_prompt=True))
    assert got[0].chosen.input_ids[:prompt_len] == got[0].rejected.input_ids[:prompt_len]


def test_string_prompt_with_message_responses(tok):
    [pair] = _pairs(tok, [{"prompt": "hi", "chosen": [_bot("hello")], "rejected": [_bot("go")]}])
    assert tok.decode(pair.chosen.input_ids).startswith("<|im_start|>user\nhi<|im_end|>")
    assert _supervised(tok, pair.rejected) == "go<|im_end|>"


def test_plain_tokenizer_pairs_append_a_supervised_eos(plain_tok):
    """A tokenizer without a chat template renders pairs through the prompt contract's template: the raw
    ``completion`` layout when asked for, alpaca under ``auto``; either way the response ends in a trained EOS."""
    record = {"prompt": "Q: 2+2? A: ", "chosen": "4", "rejected": "5"}
    [pair] = _pairs(plain_tok, [record], chat_template="completion")
    assert plain_tok.decode(pair.chosen.input_ids) == "Q: 2+2? A: 4<|im_end|>"
    assert _supervised(plain_tok, pair.chosen) == "4<|im_end|>"
    fresh = build_tokenizer()
    fresh.chat_template = None
    [pair] = _pairs(fresh, [record])
    assert fresh.decode(pair.chosen.input_ids).endswith("### Response:\n4<|im_end|>")
    assert _supervised(fresh, pair.chosen) == "4<|im_end|>"


def test_train_on_prompt_does_not_apply_to_pairs(tok):
    [pair] = _pairs(tok, [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}], train_on_prompt=True)
    assert _supervised(tok, pair.chosen) == "4<|im_end|>"


@pytest.mark.parametrize("record", [{"chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"},
                                    {"prompt": "p", "chosen": "a", "rejected": "b"},
                                    {"chosen": [], "rejected": []}])
def test_chosen_or_rejected_makes_a_preference_record(record):
    assert detect_format(record, "r") == "preference"


def test_collate_pairs_puts_chosen_rows_first(tok):
    pairs = _pairs(tok, [{"prompt": "p", "chosen": "a", "rejected": "bbbb bbbb"},
                         {"prompt": "q", "chosen": "cc", "rejected": "d"}])
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    assert batch["input_ids"].shape[0] == 4 and "position_ids" not in batch
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for r, ex in enumerate(rows):
        assert batch["input_ids"][r, :len(ex.input_ids)].tolist() == ex.input_ids


# --------------------------------------------------------------------------- file types

def test_every_file_type_reads_pairs(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"say {i}", "chosen": str(i), "rejected": str(i + 1)} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\n" + "".join(
        f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    chats = [{"chosen": [_user(r["prompt"]), _bot(r["chosen"])], "rejected": [_user(r["prompt"]), _bot(r["rejected"])]}
             for r in recs]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    ref = _pairs(tok, recs)
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "chat.parquet"):
        got, _, stats = prepare_data(DataConfig(train_file=str(tmp_path / name)), tok)
        assert got == ref, name
        assert stats.examples == 4 and stats.records == 4


# --------------------------------------------------------------------------- errors name file and line

@pytest.mark.parametrize("record, pattern", [
    ({"prompt": "p", "chosen": "a"}, r'line 2: missing field "rejected" \(preference format needs chosen, rejected\)'),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, r'line 2: field "chosen" is empty'),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, r'line 2: "chosen" and "rejected" are identical'),
    ({"chosen": "a", "rejected": "b"}, r'line 2: field "prompt" is missing or empty'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r'line 2: field "prompt" is missing or empty'),
    ({"prompt": "p", "chosen": "a", "rejected": [_bot("b")]}, r"line 2: .*both be strings or both be message lists"),
    ({"chosen": [_user("a"), _bot("b")], "rejected": [_user("c"), _bot("d")]}, r"line 2: .*share no leading messages"),
    ({"chosen": [_user("a"), _bot("b")], "rejected": [_user("a")]}, r'line 2: field "rejected" has no assistant turn'),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, r'line 2: field "rejected" must be a string, got int'),
    ({"prompt": "word " * 40, "chosen": "a", "rejected": "b"},
     r'line 2: the prompt fills data.max_seq_len=16 tokens, so the "chosen" response .* is truncated away'),
])
def test_bad_pairs_name_file_and_line(tmp_path, tok, record, pattern):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"prefs\.jsonl " + pattern):
        prepare_data(DataConfig(train_file=str(path), max_seq_len=16), tok)


def test_messages_on_a_template_less_tokenizer_go_through_the_contract(plain_tok):
    """Message lists once needed a chat template; the prompt contract now gives every tokenizer one."""
    [pair] = _pairs(plain_tok, [{"prompt": [_user("a")], "chosen": "b", "rejected": "c"}])
    assert _supervised(plain_tok, pair.chosen) == "b<|im_end|>"
    assert _supervised(plain_tok, pair.rejected) == "c<|im_end|>"


def test_eval_file_of_another_kind_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match=r"eval_file: prompt_completion records, but train_file holds preference"):
        prepare_data(DataConfig(), tok, records=[{"prompt": "p", "chosen": "a", "rejected": "b"}],
                     eval_records=[{"prompt": "p", "completion": "a"}])


def test_objective_must_fit_the_data(tok):
    pairs = _pairs(tok, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match=r"objective=sft, but data.train_file holds preference records"):
        check_objective(cfg, pairs)
    cfg.training.objective = "dpo"
    assert check_objective(cfg, pairs)
    with pytest.raises(ConfigError, match=r"objective=dpo, but data.train_file holds single-response records"):
        check_objective(cfg, [pairs[0].chosen])
    cfg.data.packing = True
    with pytest.raises(ConfigError, match="data.packing: training.objective=dpo"):
        check_objective(cfg, pairs)


# --------------------------------------------------------------------------- split and cache

def test_eval_fraction_holds_out_whole_pairs(tok):
    recs = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(10)]
    train, evals, stats = prepare_data(DataConfig(eval_fraction=0.3), tok, records=recs, seed=1)
    assert (len(train), len(evals), stats.examples, stats.eval_examples) == (7, 3, 7, 3)
    prompts = [tok.decode(p.chosen.input_ids).split("\n")[1] for p in train + evals]
    assert sorted(prompts) == sorted(f"q{i}<|im_end|>" for i in range(10))
    for p in train + evals:
        assert _supervised(tok, p.chosen).replace("yes", "no") == _supervised(tok, p.rejected)


def test_cached_pairs_equal_fresh_ones(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a" * i, "rejected": "b"}) + "\n"
                            for i in range(1, 5)))
    cfg = DataConfig(train_file=str(path), cache_dir=str(tmp_path / "cache"))
    first, _, _ = prepare_data(cfg, tok)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again, _, _ = prepare_data(cfg, tok)
    assert again == first and all(isinstance(p, PreferenceExample) for p in again)
