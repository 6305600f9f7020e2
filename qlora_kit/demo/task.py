"""The demo's task: turn a free-text person record into one fixed-shape CSV line.

Each example gives a person's name, birth date and city in one of several sentence shapes and date
styles ("Maria Lopez was born on 5 March 1987 in Lyon.", "Lopez, Maria (Lyon, born Mar 5 1987)", ...);
the answer is always ``last_name,first_name,YYYY-MM-DD,city`` (``Lopez,Maria,1987-03-05,Lyon``).

Why this task: the answer is short and exactly checkable, prompts and answers vary in length, and it
needs no arithmetic, only reordering, copying and a month-name-to-number lookup. The instruction states
the format, yet the 4-bit base SmolLM2-135M-Instruct almost never produces it exactly (it writes prose,
keeps the input's date style or drops fields), while a LoRA adapter learns it within one short epoch on
a CPU. The data are generated deterministically from a seed; nothing is downloaded.

Measured on the default split (seed 0, 600 + 100), 4-bit NF4 + double quant, bf16 compute (AMX CPU):
base model 0% held-out exact match; after one epoch of LoRA r=16 alpha=32 on all linear layers
(batch 8, AdamW lr 2e-4, 5% warmup then cosine, response-only loss) 82%. An example is about 105
tokens in SmolLM2's chat template (the template adds its default system prompt), 63k tokens per epoch.
"""
from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

from qlora_kit.atomic import atomic_write_bytes

FIRST_NAMES = [
    "Maria", "James", "Aiko", "Lars", "Fatima", "Noah", "Elena", "Omar", "Chloe", "Mateo", "Ingrid", "Ravi",
    "Sofia", "Kwame", "Hannah", "Diego", "Yuki", "Pierre", "Amara", "Lucas", "Zara", "Tomasz", "Leila", "Ethan",
    "Mei", "Arjun", "Freya", "Hugo", "Nadia", "Samuel", "Olga", "Kenji", "Isabel", "Felix", "Priya", "Jonas",
    "Camila", "Mikhail", "Grace", "Emeka", "Astrid", "Rafael", "Ana", "Henrik", "Lucia", "Tariq", "Julia", "Oscar",
    "Anika", "Bruno", "Clara", "Dmitri", "Eva", "Gustav", "Hana", "Ivan", "Jasmine", "Karim", "Lena", "Marco",
]
LAST_NAMES = [
    "Lopez", "Smith", "Tanaka", "Berg", "Haddad", "Miller", "Petrova", "Farouk", "Dubois", "Garcia", "Larsen",
    "Sharma", "Rossi", "Mensah", "Schmidt", "Alvarez", "Sato", "Moreau", "Okafor", "Silva", "Khan", "Nowak",
    "Rahimi", "Walker", "Chen", "Patel", "Nilsson", "Fischer", "Ivanova", "Cohen", "Kowalski", "Yamamoto",
    "Santos", "Weber", "Iyer", "Lindqvist", "Romero", "Volkov", "Bennett", "Adeyemi", "Holm", "Costa", "Novak",
    "Jensen", "Ferrari", "Aziz", "Keller", "Olsen", "Murphy", "Brandt", "Castillo", "Dahl", "Eriksen", "Fontaine",
    "Gallo", "Hughes", "Ibrahim", "Jovanovic", "Kim", "Lambert",
]
CITIES = [
    "Lyon", "Osaka", "Bergen", "Cairo", "Denver", "Porto", "Nairobi", "Kraków", "Seville", "Pune", "Leeds",
    "Hamburg", "Turin", "Accra", "Quebec", "Malmö", "Rio de Janeiro", "New York", "Cape Town", "Buenos Aires",
    "Salzburg", "Tallinn", "Lagos", "Kyoto", "Dublin", "Valencia", "Austin", "Geneva", "Antwerp", "Bologna",
    "Gdansk", "Lisbon", "Oslo", "Tunis", "Perth", "Boston", "Marseille", "Zagreb", "Ghent", "Hanoi",
]
MONTHS = [  # English names, not calendar.month_name (that follows the locale)
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]

INSTRUCTIONS = [
    "Convert the record to one CSV line: last_name,first_name,birth_date,city (date as YYYY-MM-DD).",
    "Write this person as a CSV line with the fields last_name,first_name,birth_date (YYYY-MM-DD),city.",
    "Extract last name, first name, birth date (YYYY-MM-DD) and city as one comma-separated line.",
]

# Sentence shapes for the input; {date} is filled in one of the DATE_STYLES below.
TEMPLATES = [
    "{first} {last} was born on {date} in {city}.",
    "{first} {last}, born {date}, lives in {city}.",
    "Name: {first} {last}; date of birth: {date}; city: {city}",
    "{last}, {first} ({city}, born {date})",
    "Born {date} in {city}: {first} {last}",
    "{city} resident {first} {last}, date of birth {date}.",
    "Record for {last}, {first}. Born on {date}. Home town: {city}.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _format_date(style: int, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    return [
        f"{day} {name} {year}",  # 5 March 1987
        f"{name} {day}, {year}",  # March 5, 1987
        f"{_ordinal(day)} of {name} {year}",  # 5th of March 1987
        f"{name[:3]} {day} {year}",  # Mar 5 1987
        f"{year}-{month:02d}-{day:02d}",  # 1987-03-05
    ][style]


N_DATE_STYLES = 5


def _record(rng: random.Random, first: str, last: str) -> dict:
    year = rng.randint(1940, 2005)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    city = rng.choice(CITIES)
    date = _format_date(rng.randrange(N_DATE_STYLES), year, month, day)
    text = rng.choice(TEMPLATES).format(first=first, last=last, date=date, city=city)
    return {"instruction": rng.choice(INSTRUCTIONS), "input": text,
            "output": f"{last},{first},{year}-{month:02d}-{day:02d},{city}"}


def _people(rng: random.Random, n: int, taken: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """``n`` (first, last) pairs not in ``taken`` (which is updated), drawn in a seed-determined order."""
    if n > len(FIRST_NAMES) * len(LAST_NAMES) - len(taken):
        raise ValueError(f"at most {len(FIRST_NAMES) * len(LAST_NAMES)} distinct people; asked for {n} more "
                         f"beside {len(taken)}")
    out = []
    while len(out) < n:
        pair = (rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES))
        if pair not in taken:
            taken.add(pair)
            out.append(pair)
    return out


def make_demo_dataset(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Generate the demo task's training and held-out records, in alpaca form.

    Each record has ``instruction``, ``input`` and ``output`` (the CSV line). The same arguments always give
    the same records. Every person (first and last name together) appears in only one record, so no
    held-out input, and no held-out person, occurs in training. The held-out set depends only on
    ``n_eval`` and ``seed``; for a given ``n_eval`` and ``seed``, a smaller ``n_train`` gives the first
    records of a larger one.

    Args:
        n_train: number of training records.
        n_eval: number of held-out records.
        seed: any integer; different seeds give different datasets.
    Returns:
        ``(train, eval)``: two lists of dicts.
    Raises:
        ValueError for negative sizes or more records than distinct people (3600).
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"dataset sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    taken: set[tuple[str, str]] = set()
    eval_rng = random.Random(f"qlora-kit-demo-task:{seed}:eval")
    eval_records = [_record(eval_rng, first, last) for first, last in _people(eval_rng, n_eval, taken)]
    train_rng = random.Random(f"qlora-kit-demo-task:{seed}:train")
    train_people: list[tuple[str, str]] = []
    # Draw training people one at a time, so a prefix of the draw does not depend on n_train.
    for _ in range(n_train):
        train_people += _people(train_rng, 1, taken)
    # Records are drawn after all people, from their own stream, so they too are prefix-stable.
    record_rng = random.Random(f"qlora-kit-demo-task:{seed}:train-records")
    train_records = [_record(record_rng, first, last) for first, last in train_people]
    return train_records, eval_records


def write_demo_dataset(out_dir: str | Path, n_train: int = 600, n_eval: int = 100,
                       seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (one alpaca record per line, UTF-8) into ``out_dir``, atomically.

    Returns the two paths. Each file appears complete under its final name, or not at all.
    """
    out_dir = Path(out_dir)
    train, held_out = make_demo_dataset(n_train, n_eval, seed)
    paths = (out_dir / "train.jsonl", out_dir / "eval.jsonl")
    for path, records in zip(paths, (train, held_out)):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        atomic_write_bytes(path, data)
    return paths


def user_content(record: dict) -> str:
    """The user message for an alpaca record, as training renders it: the instruction, then a blank line
    and the input when there is one. It goes through the chat template with no system prompt."""
    instruction, extra = record["instruction"], record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra else instruction
