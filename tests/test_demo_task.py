"""The demo task's generated data and its exact-match scoring (no model needed)."""
from __future__ import annotations

import json
import re

import pytest

from qlora_kit.demo.task import make_demo_dataset, user_content, write_demo_dataset
from qlora_kit.inference.evaluate import exact_match, normalize_answer

ANSWER = re.compile(r"^[^,\s][^,]*,[^,\s][^,]*,\d{4}-\d{2}-\d{2},[^,\s][^,]*$")


@pytest.fixture(scope="module")
def dataset():
    return make_demo_dataset()


def test_default_sizes_and_alpaca_fields(dataset):
    train, held_out = dataset
    assert len(train) == 600 and len(held_out) == 100
    for r in train + held_out:
        assert set(r) == {"instruction", "input", "output"}
        assert all(isinstance(r[k], str) and r[k].strip() for k in r)


def test_deterministic_for_a_seed_and_different_across_seeds(dataset):
    assert make_demo_dataset() == dataset
    assert make_demo_dataset(seed=1) != dataset
    assert make_demo_dataset(seed=1) == make_demo_dataset(seed=1)


def test_train_and_eval_disjoint(dataset):
    train, held_out = dataset
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    # Stronger: no held-out person appears in training, and no person twice anywhere.
    people = [r["output"].split(",")[:2] for r in train + held_out]
    assert len({tuple(p) for p in people}) == len(people)


def test_smaller_train_size_gives_a_prefix_and_eval_ignores_train_size(dataset):
    train, held_out = dataset
    assert make_demo_dataset(n_train=50)[0] == train[:50]
    assert make_demo_dataset(n_train=10)[1] == held_out


def test_answers_have_the_fixed_shape_and_match_the_input(dataset):
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    for r in dataset[0] + dataset[1]:
        out = r["output"]
        assert ANSWER.match(out), out
        assert normalize_answer(out) == out
        last, first, date, city = out.split(",")
        year, month, day = (int(x) for x in date.split("-"))
        assert first in r["input"] and last in r["input"] and city in r["input"] and str(year) in r["input"]
        month_in_input = months[month - 1][:3] in r["input"] or date in r["input"]
        assert month_in_input, (r["input"], out)


def test_inputs_vary_in_shape_and_length(dataset):
    train = dataset[0]
    assert len({r["instruction"] for r in train}) >= 3
    lengths = [len(r["input"]) for r in train]
    assert max(lengths) - min(lengths) >= 20
    # Every date style occurs: ISO, "5 March", "March 5,", "5th of March", "Mar 5".
    inputs = " | ".join(r["input"] for r in train)
    assert re.search(r"\d{4}-\d{2}-\d{2}", inputs)
    assert re.search(r"\b\d{1,2} [A-Z][a-z]{3,} \d{4}", inputs)
    assert re.search(r"[A-Z][a-z]{3,} \d{1,2}, \d{4}", inputs)
    assert re.search(r"\d{1,2}(st|nd|rd|th) of [A-Z]", inputs)
    assert re.search(r"\b[A-Z][a-z]{2} \d{1,2} \d{4}", inputs)


def test_user_content_renders_alpaca_like_training():
    assert user_content({"instruction": "Do X.", "input": "data", "output": "y"}) == "Do X.\n\ndata"
    assert user_content({"instruction": "Do X.", "input": "", "output": "y"}) == "Do X."
    assert user_content({"instruction": "Do X.", "output": "y"}) == "Do X."


def test_normalize_answer_is_strict_and_idempotent():
    cases = ["  Lopez,Maria,1987-03-05,Lyon \n", "Lopez,Maria,1987-03-05,Lyon.", "lopez, maria", "```\nx\n```",
             "a. .", "", "   ", "..."]
    for text in cases:
        once = normalize_answer(text)
        assert normalize_answer(once) == once
    assert normalize_answer("  Lopez,Maria,1987-03-05,Lyon.\n") == "Lopez,Maria,1987-03-05,Lyon"
    assert normalize_answer("a. .") == "a" and normalize_answer("...") == ""
    assert normalize_answer("Lopez, Maria") == "Lopez, Maria"  # inner spacing is kept
    assert normalize_answer("`Lopez`") == "`Lopez`" and normalize_answer("x\ny") == "x\ny"
    assert normalize_answer("LOPEZ") != normalize_answer("Lopez")


def test_normalize_answer_idempotent_on_all_references(dataset):
    for r in dataset[0] + dataset[1]:
        once = normalize_answer(r["output"])
        assert normalize_answer(once) == once


def test_exact_match_on_known_pairs():
    refs = ["Lopez,Maria,1987-03-05,Lyon", "Chen,Mei,2001-12-31,New York", "Kim,Ana,1950-01-01,Oslo"]
    assert exact_match(refs, refs) == 1.0
    assert exact_match([" Lopez,Maria,1987-03-05,Lyon.\n", "Chen,Mei,2001-12-31,New York", "x"], refs) == pytest.approx(2 / 3)
    wrong = ["Maria,Lopez,1987-03-05,Lyon", "Chen, Mei, 2001-12-31, New York",
             "Kim,Ana,1950-01-01,Oslo\nKim,Ana,1950-01-01,Oslo"]
    assert exact_match(wrong, refs) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        make_demo_dataset(n_train=-1)
    with pytest.raises(ValueError):
        make_demo_dataset(n_train=4000, n_eval=0)


def test_write_demo_dataset_round_trips(tmp_path, dataset):
    train_path, eval_path = write_demo_dataset(tmp_path / "data")
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    for path, records in ((train_path, dataset[0]), (eval_path, dataset[1])):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == records
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temporary files left
    first = train_path.read_bytes()
    write_demo_dataset(tmp_path / "data")
    assert train_path.read_bytes() == first


def test_evaluate_renders_demo_prompts_as_before_and_scores(monkeypatch, dataset):
    """The demo's evaluation (``inference.evaluate``) prompts with ``user_content`` through the chat template,
    no system prompt, no added special tokens, exactly as the demo's own loop did; exact match as before."""
    import qlora_kit.inference.evaluate as ev
    from qlora_kit.inference.generate import Generation
    from qlora_kit.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    records = dataset[1][:3]
    seen = {}
    answers = [records[0]["output"], "wrong", records[2]["output"] + "."]

    def fake_generate_tokens(model, tok, prompts, max_new_tokens=64, batch_size=None, **kw):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return Generation([tok(a, add_special_tokens=False)["input_ids"] for a in answers], 1.0, 7)

    monkeypatch.setattr(ev, "generate_tokens", fake_generate_tokens)
    result = ev.evaluate(object(), tokenizer, records, max_new_tokens=20, batch_size=7, loss=False)
    assert result.score == pytest.approx(2 / 3)
    assert [e.prediction for e in result.examples] == [answers[0], "wrong", answers[2]]
    assert [e.correct for e in result.examples] == [True, False, True]
    want = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
                                          tokenize=False, add_generation_prompt=True) for r in records]
    assert [p.text for p in seen["prompts"]] == want
    assert not any(p.special_tokens for p in seen["prompts"])
    assert (seen["max_new_tokens"], seen["batch_size"]) == (20, 7)


def test_try_it_command_pastes_into_a_shell_whole(dataset, tmp_path):
    """The demo's final hint: a complete held-out prompt (newlines, quotes, $ and all), shell-quoted, that the
    CLI parses back to exactly that prompt (it used to be cut with "...")."""
    import shlex

    from qlora_kit.cli import build_parser
    from qlora_kit.demo.run import try_it_command

    adapter = tmp_path / "my runs" / "adapter"
    for prompt in [user_content(dataset[1][0]), "O'Brien said \"hi\" $HOME `x`\n\nback\\slash"]:
        cmd = try_it_command(adapter, prompt)
        assert "..." not in cmd or "..." in prompt
        argv = shlex.split(cmd)
        assert argv[:2] == ["qlora-kit", "generate"] and argv[-1] == prompt
        args = build_parser().parse_args(argv[1:])
        assert args.prompt == [prompt] and args.adapter == [str(adapter)]  # one prompt, whole


def test_demo_estimate_probes_leave_the_model_as_found(tiny_model_dir):
    """The duration estimate times a real training step and generation batch, then scales by the planned work;
    the probes leave no gradient, no hook and the same mode behind."""
    from conftest import load_tiny

    from qlora_kit.config import DataConfig, TrainConfig, TrainingConfig
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.demo.estimate import estimate_demo
    from qlora_kit.inference.prompts import record_prompt

    model, tok = load_tiny(tiny_model_dir)
    model.eval()
    records = make_demo_dataset(n_train=24, n_eval=8)
    train_set, eval_set, _ = prepare_data(DataConfig(max_seq_len=2048), tok, records=records[0],
                                          eval_records=records[1])
    prompts = [record_prompt(tok, r)[0] for r in records[1]]
    config = TrainConfig(data=DataConfig(max_seq_len=2048), training=TrainingConfig(batch_size=4, eval_every=2))
    hooks = len(model.get_input_embeddings()._forward_hooks)
    est = estimate_demo(model, tok, train_set, eval_set, prompts, config, max_new_tokens=8)
    assert est.step > 0 and est.evaluation > 0
    assert est.training >= 6 * est.step  # 24 examples / batch 4 = 6 steps, plus validation passes
    assert est.total == 2 * est.evaluation + est.training
    assert not model.training and len(model.get_input_embeddings()._forward_hooks) == hooks
    assert all(p.grad is None for p in model.parameters())
