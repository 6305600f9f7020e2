"""Data pipeline: formats and masking, errors naming file and line, caching, splits, batching and packing."""
import json

import pytest
import torch
from conftest import load_tiny

from qlora_kit.config import DataConfig
from qlora_kit.data import DataError
from qlora_kit.data import tokenize as tokenize_module
from qlora_kit.data.batching import collate, make_batches
from qlora_kit.data.formats import detect_format
from qlora_kit.data.prepare import DataStats, prepare_data
from qlora_kit.data.sources import load_records
from qlora_kit.data.tokenize import Example, n_supervised, tokenize_example
from qlora_kit.testing.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = build_tokenizer()
    t.chat_template = None
    return t


def _supervised(tok, ex: Example) -> list[str]:
    """The supervised text, one string per contiguous run of supervised tokens."""
    runs, cur = [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != -100:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- masking per format

def test_multi_turn_chat_supervises_every_assistant_turn_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}]
    ex = tokenize_example({"messages": msgs}, "chat", tok, DataConfig(), "mem")
    # the input is exactly what the template renders: nothing appended, nothing lost
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    # each reply and its end-of-turn token (the EOS) are trained; system, user and role headers are not
    assert _supervised(tok, ex) == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_chat_ending_with_user_turn_trains_only_earlier_replies(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ex = tokenize_example({"messages": msgs}, "chat", tok, DataConfig(), "mem")
    assert _supervised(tok, ex) == ["b<|im_end|>"]


def test_alpaca_through_chat_template_with_system_prompt(tok):
    rec = {"instruction": "Add the numbers", "input": "2 3", "output": "5"}
    ex = tokenize_example(rec, "alpaca", tok, DataConfig(system_prompt="You add."), "mem")
    msgs = [{"role": "system", "content": "You add."}, {"role": "user", "content": "Add the numbers\n\n2 3"},
            {"role": "assistant", "content": "5"}]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert _supervised(tok, ex) == ["5<|im_end|>"]


def test_prompt_completion_and_text_formats(tok):
    ex = tokenize_example({"prompt": "2+2=", "completion": "4"}, "prompt_completion", tok, DataConfig(), "mem")
    assert _supervised(tok, ex) == ["4<|im_end|>"]
    ex = tokenize_example({"text": "the quick fox"}, "text", tok, DataConfig(), "mem")
    assert _supervised(tok, ex) == ["the quick fox<|im_end|>"]  # all tokens, plus a supervised EOS
    assert ex.input_ids[-1] == tok.eos_token_id


def test_without_chat_template_the_alpaca_contract_ends_replies_with_supervised_eos(plain_tok):
    rec = {"instruction": "Do it", "input": "now", "output": "done"}
    ex = tokenize_example(rec, "alpaca", plain_tok, DataConfig(), "mem")
    # data.chat_template=auto gives a template-less tokenizer the alpaca template: one user turn (instruction,
    # blank line, input) as for a tokenizer with a chat template, then the reply and EOS
    expected = "### Instruction:\nDo it\n\nnow\n\n### Response:\ndone<|im_end|>"
    assert plain_tok.decode(ex.input_ids) == expected
    assert _supervised(plain_tok, ex) == ["done<|im_end|>"]
    ex = tokenize_example({"prompt": "Q: x\nA:", "completion": " y"}, "prompt_completion", plain_tok, DataConfig(), "m")
    assert _supervised(plain_tok, ex) == [" y<|im_end|>"]


def test_train_on_prompt_supervises_everything(tok):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ex = tokenize_example(rec, "chat", tok, DataConfig(train_on_prompt=True), "mem")
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize("record, fmt", [({"instruction": "i", "output": "o"}, "alpaca"),
                                         ({"messages": []}, "chat"), ({"prompt": "p", "completion": "c"},
                                                                       "prompt_completion"),
                                         ({"text": "t"}, "text"), ({"output": "o"}, "alpaca")])
def test_detect_format(record, fmt):
    assert detect_format(record, "f line 1") == fmt


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("lines, pattern", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
     r"train\.jsonl line 2: malformed JSON"),
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
     r'train\.jsonl line 3: missing field "output" \(alpaca format needs instruction, output\)'),
    (['{"instruction": "a", "output": 42}'], r'train\.jsonl line 1: field "output" must be a string, got int'),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}'],
     r'train\.jsonl line 1: field "messages\[1\]\.content" must be a string'),
    (['{"question": "a", "answer": "b"}'], r"train\.jsonl line 1: cannot tell the record format"),
    (['["not", "an", "object"]'], r"train\.jsonl line 1: expected a JSON object"),
    ([], r"train\.jsonl: no records"),
])
def test_bad_data_errors_name_file_line_and_field(tmp_path, tok, lines, pattern):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=pattern):
        prepare_data(DataConfig(train_file=str(path)), tok)


def test_every_example_too_long(tmp_path, tok):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 40, "output": "x"}] * 3)
    with pytest.raises(DataError, match=r"long\.jsonl: all 3 examples were dropped: 3 were longer than "
                                        r"data\.max_seq_len=16.*raise data\.max_seq_len"):
        prepare_data(DataConfig(train_file=str(path), max_seq_len=16), tok)


def test_csv_error_names_line_and_missing_file(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\nhi,there\n"multi\nline"\nok,fine\n')  # row 2 (line 3) lacks output
    with pytest.raises(DataError, match=r'd\.csv line 3: missing field "output"'):
        prepare_data(DataConfig(train_file=str(path)), tok)
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        prepare_data(DataConfig(train_file=str(tmp_path / "nope.jsonl")), tok)


# --------------------------------------------------------------------------- file types, truncation, stats

def test_jsonl_json_csv_parquet_and_in_memory_agree(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(6)]
    _write_jsonl(tmp_path / "a.jsonl", recs)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},,{r['output']}\n" for r in recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        assert load_records(tmp_path / name) == recs, name
    ref, _, _ = prepare_data(DataConfig(train_file=str(tmp_path / "a.parquet")), tok)
    mem, _, _ = prepare_data(DataConfig(), tok, records=recs)
    hf, _, _ = prepare_data(DataConfig(), tok, records=datasets.Dataset.from_list(recs))
    assert ref == mem == hf


def test_truncation_and_drop_counts(tmp_path, tok):
    recs = [{"prompt": "p", "completion": "short"},
            {"prompt": "p", "completion": "a much longer completion " * 4},  # truncated, response kept
            {"prompt": "long prompt " * 10, "completion": "x"},  # truncated inside the prompt: dropped
            {"prompt": "p", "completion": ""}]  # empty reply still has its EOS target: kept
    train, _, stats = prepare_data(DataConfig(max_seq_len=20), tok, records=recs)
    assert (stats.records, stats.truncated, stats.dropped, stats.examples) == (4, 2, 1, 3)
    assert all(len(e.input_ids) <= 20 for e in train)
    assert stats.tokens == sum(len(e.input_ids) for e in train) and stats.len_max == 20
    assert stats.supervised_tokens == sum(n_supervised(e.labels) for e in train)


# --------------------------------------------------------------------------- cache

def test_cache_hit_and_invalidation(tmp_path, tok, monkeypatch):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    calls = []
    real = tokenize_module.tokenize_example
    monkeypatch.setattr(tokenize_module, "tokenize_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = DataConfig(train_file=str(path), eval_fraction=0.2)
    first = prepare_data(cfg, tok, cache_dir=tmp_path / "cache")
    assert len(calls) == 5
    assert list((tmp_path / "cache").glob("*.safetensors")) and not list((tmp_path / "cache").glob("*.pkl"))
    second = prepare_data(cfg, tok, cache_dir=tmp_path / "cache")
    assert len(calls) == 5  # served from the cache
    assert second[0] == first[0] and second[1] == first[1] and second[2] == first[2]
    prepare_data(DataConfig(train_file=str(path), max_seq_len=64), tok, cache_dir=tmp_path / "cache")
    assert len(calls) == 10  # a setting that changes tokenization misses
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "new", "completion": "one"}) + "\n")
    third = prepare_data(cfg, tok, cache_dir=tmp_path / "cache")
    assert len(calls) == 16 and third[2].records == 6  # file changed: tokenized again


# --------------------------------------------------------------------------- validation split

def test_eval_fraction_split_is_disjoint_and_fixed_by_seed(tok):
    recs = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    cfg = DataConfig(eval_fraction=0.25)
    tr, ev, stats = prepare_data(cfg, tok, records=recs, seed=1)
    key = lambda e: tuple(e.input_ids)  # noqa: E731
    assert len(ev) == 10 and len(tr) == 30 and stats.eval_examples == 10
    assert not {key(e) for e in tr} & {key(e) for e in ev}
    tr2, ev2, _ = prepare_data(cfg, tok, records=recs, seed=1)
    assert ev2 == ev and tr2 == tr
    _, ev3, _ = prepare_data(cfg, tok, records=recs, seed=2)
    assert ev3 != ev


def test_eval_records_used_instead_of_fraction(tok):
    tr, ev, stats = prepare_data(DataConfig(eval_fraction=0.5), tok, records=[{"text": "a b"}] * 4,
                                 eval_records=[{"text": "c"}])
    assert len(tr) == 4 and len(ev) == 1 and stats.records == 5


# --------------------------------------------------------------------------- batching

def _var_examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 60, (n,), generator=g).tolist()
    return [Example(list(range(10, 10 + k)), [-100] * (k // 2) + list(range(10 + k // 2, 10 + k))) for k in lengths]


@pytest.mark.parametrize("packing, group", [(False, False), (False, True), (True, False)])
def test_batches_are_deterministic_and_cover_each_example_once(packing, group):
    exs = _var_examples(200)
    cfg = DataConfig(packing=packing, group_by_length=group, max_seq_len=64)
    a = make_batches(exs, 4, cfg, seed=3, epoch=0)
    assert a == make_batches(exs, 4, cfg, seed=3, epoch=0)
    assert a != make_batches(exs, 4, cfg, seed=3, epoch=1) and a != make_batches(exs, 4, cfg, seed=4, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(200))
    for b in a:
        batch = collate([exs[i] for i in b], 0, packing, 64)
        assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= 64


def test_group_by_length_reduces_padding():
    exs = _var_examples(400)
    stats = {}
    for group in (False, True):
        s = DataStats()
        make_batches(exs, 8, DataConfig(group_by_length=group), seed=0, epoch=0, stats=s)
        stats[group] = s.padding_fraction
    assert stats[True] < 0.5 * stats[False]
    s = DataStats()
    make_batches(exs, 8, DataConfig(packing=True, max_seq_len=128), seed=0, epoch=0, stats=s)
    assert s.padding_fraction < stats[True]


def test_collate_padding_and_packed_positions():
    exs = [Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [8, 9]), Example([4, 4, 4, 4], [-100, -100, 4, 4])]
    b = collate(exs, pad_id=0, packing=False, max_seq_len=8)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [4, 4, 4, 4]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100], [-100, -100, 4, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    p = collate(exs, pad_id=0, packing=True, max_seq_len=6)
    assert "attention_mask" not in p  # so transformers detects packing from position_ids
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 0]]  # padded to the longest row
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # an example's first token is never a target: the previous example must not learn to predict it
    assert p["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, 4, 4, -100]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tiny_model_dir, tok, attn):
    model, _ = load_tiny(tiny_model_dir)
    model.set_attn_implementation(attn)
    recs = [{"prompt": "What is the capital of France?", "completion": "Paris."},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"text": "The quick brown fox jumps over the lazy dog."}]
    exs = [tokenize_example(r, detect_format(r, "m"), tok, DataConfig(), "m") for r in recs]
    batch = collate(exs, tok.pad_token_id, packing=True, max_seq_len=128)
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]  # [s, V]
        at = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # [n, V]
            torch.testing.assert_close(packed[at:at + len(ex.input_ids)], alone, atol=1e-4, rtol=1e-4)
            at += len(ex.input_ids)
        # the same row with an all-ones attention mask does leak across examples: the test can fail
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
        n0, n1 = len(exs[0].input_ids), len(exs[1].input_ids)
        assert (leaky[n0:n0 + n1] - packed[n0:n0 + n1]).abs().max() > 1e-2


def test_packed_loss_equals_sum_of_losses_alone(tiny_model_dir, tok):
    from qlora_kit.training.loss import causal_lm_loss

    model, _ = load_tiny(tiny_model_dir)
    recs = [{"text": "0123456789 abc"}, {"prompt": "Convert 2024-03-05", "completion": "March fifth, 2024."},
            {"text": "user assistant system"}]
    exs = [tokenize_example(r, detect_format(r, "m"), tok, DataConfig(train_on_prompt=True), "m") for r in recs]
    with torch.no_grad():
        packed, n_packed = causal_lm_loss(model, collate(exs, tok.pad_token_id, True, 128))
        alone = [causal_lm_loss(model, collate([e], tok.pad_token_id, False, 128)) for e in exs]
    assert n_packed == sum(n for _, n in alone) == sum(len(e.input_ids) - 1 for e in exs)
    torch.testing.assert_close(packed, sum(loss for loss, _ in alone), atol=1e-4, rtol=1e-5)


def test_template_that_is_not_prefix_stable_is_a_clear_error():
    t = build_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if messages %}END{% endif %}"
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"f line 4: the chat template does not render the conversation prefix"):
        tokenize_example(rec, "chat", t, DataConfig(), "f line 4")


def test_unknown_chat_role_names_file_line_role_and_allowed_roles(tok, tmp_path):
    hi = {"role": "user", "content": "hi"}
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [hi, {"role": "assistant", "content": "hello"}]},
        {"messages": [hi, {"role": "narrator", "content": "hello"}]},
    ])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train_file=str(path), format="chat"), tok)
    assert str(e.value).startswith(f"{path} line 2: ")
    assert "'narrator'" in str(e.value) and "system, user, assistant" in str(e.value)


def test_tool_role_only_when_the_chat_template_mentions_tools(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"},
                          {"role": "assistant", "content": "It is sunny."}]}]
    path = _write_jsonl(tmp_path / "tool.jsonl", rows)
    with pytest.raises(DataError, match=r"line 1: .*'tool'.*use one of system, user, assistant$"):
        prepare_data(DataConfig(train_file=str(path), format="chat"), tok)
    with_tools = build_tokenizer()
    with_tools.chat_template = "{# tools: role 'tool' supported #}" + tok.chat_template
    train, _, _ = prepare_data(DataConfig(train_file=str(path), format="chat"), with_tools)
    assert len(train) == 1 and "sunny" in with_tools.decode(train[0].input_ids)


def test_config_format_names_are_the_formats_table():
    """DataConfig.format's check (config layer, which cannot import data) names exactly the FORMATS entries."""
    from qlora_kit.config import ConfigError, DataConfig
    from qlora_kit.data.formats import FORMATS

    for name in FORMATS:
        DataConfig(format=name).validate()
    with pytest.raises(ConfigError) as refused:
        DataConfig(format="nope").validate()
    listed = set(str(refused.value).split("; use ", 1)[1].replace(" or ", ", ").split(", ")) - {"auto"}
    assert listed == set(FORMATS)
