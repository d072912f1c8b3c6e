"""Two small chat datasets, each teaching SmolLM2-135M-Instruct a skill it lacks, with held-out eval splits.

- dates:    a written date in one of 14 surface forms ("Sept. 9th, 2004", "the twenty-first of October 2010",
            "2021, March 14", ...) -> exactly its ISO 8601 form, "2004-09-09".
- contacts: a sentence about a person in one of 12 templates -> one line of JSON with fixed keys in fixed order,
            {"name": "Maria Lopez", "age": 34, "city": "Madrid", "job": "nurse"}.

Each skill gets 400 train and 100 eval examples, one chat a line: {"messages": [user, assistant]}. The output is a
pure function of SEED. The splits are disjoint: no date (dates) and no person (contacts) is in both, so no user
message is either. Eval also measures generalisation to values never trained on: some years (dates) and some first
names, surnames, cities and jobs (contacts) occur only in eval, about half of each eval example's values being
drawn from those held-out pools. Instruction phrasings and sentence templates are shared by both splits.

    python examples/skills/make_datasets.py            # writes examples/data/{dates,contacts}/{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
from pathlib import Path

SEED = 20250
N_TRAIN, N_EVAL = 400, 100
OUT = Path(__file__).resolve().parent.parent / "data"

# ---------------------------------------------------------------------------------------------------------------
# dates
# ---------------------------------------------------------------------------------------------------------------
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
# Abbreviations as people write them; "Sept" beside "Sep" on purpose.
MONTH_ABBR = [
    ["Jan"],
    ["Feb"],
    ["Mar"],
    ["Apr"],
    ["May"],
    ["Jun"],
    ["Jul"],
    ["Aug"],
    ["Sep", "Sept"],
    ["Oct"],
    ["Nov"],
    ["Dec"],
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
_TEENS = [
    "tenth",
    "eleventh",
    "twelfth",
    "thirteenth",
    "fourteenth",
    "fifteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
]
YEARS = range(1901, 2050)
N_HELDOUT_YEARS = 15

DATE_INSTRUCTIONS = [
    "Convert {date} to ISO 8601. Reply with the date only.",
    "What is {date} in YYYY-MM-DD format? Answer with just the date.",
    'Write the date "{date}" as YYYY-MM-DD.',
    "ISO 8601 date for: {date}",
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD), nothing else: {date}",
    "Normalize to YYYY-MM-DD: {date}",
]


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ordinal_word(n: int) -> str:
    """first .. thirty-first."""
    if n < 10:
        return _UNITS[n]
    if n < 20:
        return _TEENS[n - 10]
    tens = {2: "twent", 3: "thirt"}[n // 10]
    return f"{tens}ieth" if n % 10 == 0 else f"{tens}y-{_UNITS[n % 10]}"


def abbr(d: dt.date, rng: random.Random) -> str:
    """A month abbreviation, with or without its full stop ("May" has none)."""
    a = rng.choice(MONTH_ABBR[d.month - 1])
    return a if a == "May" or rng.random() < 0.5 else a + "."


# Each surface form renders a date unambiguously: the month is always a word.
DATE_FORMS = [
    lambda d, r: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 14, 2021
    lambda d, r: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 14 March 2021
    lambda d, r: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # the 3rd of June 1998
    lambda d, r: f"{abbr(d, r)} {ordinal(d.day)}, {d.year}",  # Sept. 9th, 2004
    lambda d, r: f"{ordinal_word(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # twenty-first of October 2010
    lambda d, r: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",  # 2021, March 14
    lambda d, r: f"{abbr(d, r)} {d.day} {d.year}",  # Mar 14 2021
    lambda d, r: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Sunday, March 14, 2021
    lambda d, r: f"{ordinal(d.day)} {MONTHS[d.month - 1]}, {d.year}",  # 14th March, 2021
    lambda d, r: f"{MONTHS[d.month - 1]} the {ordinal(d.day)}, {d.year}",  # March the 14th, 2021
    lambda d, r: f"{d.day:02d}-{MONTH_ABBR[d.month - 1][0]}-{d.year}",  # 14-Mar-2021
    lambda d, r: f"{MONTHS[d.month - 1].lower()} {d.day} {d.year}",  # march 14 2021
    lambda d, r: f"{MONTHS[d.month - 1]} {ordinal_word(d.day)}, {d.year}",  # October twenty-first, 2010
    lambda d, r: f"the {ordinal_word(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the ninth of May, 1987
]


def date_example(d: dt.date, rng: random.Random) -> dict:
    text = rng.choice(DATE_FORMS)(d, rng)
    user = rng.choice(DATE_INSTRUCTIONS).format(date=text)
    return chat(user, d.isoformat())


def random_date(years: list[int], rng: random.Random) -> dt.date:
    start = dt.date(rng.choice(years), 1, 1)
    return start + dt.timedelta(days=rng.randrange(366 if calendar.isleap(start.year) else 365))


def dates(rng: random.Random) -> tuple[list[dict], list[dict]]:
    heldout = sorted(rng.sample(list(YEARS), N_HELDOUT_YEARS))
    seen = [y for y in YEARS if y not in heldout]
    used: set[dt.date] = set()

    def draw(pick_years) -> dt.date:
        while True:
            d = random_date(pick_years(), rng)
            if d not in used:
                used.add(d)
                return d

    train = [date_example(draw(lambda: seen), rng) for _ in range(N_TRAIN)]
    evals = [date_example(draw(lambda: heldout if rng.random() < 0.5 else seen), rng) for _ in range(N_EVAL)]
    return train, evals


# ---------------------------------------------------------------------------------------------------------------
# contacts
# ---------------------------------------------------------------------------------------------------------------
FIRST = [
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Olga",
    "Tom",
    "Priya",
    "Lucas",
    "Fatima",
    "Kenji",
    "Sofia",
    "David",
    "Amara",
    "Ivan",
    "Grace",
    "Mateo",
    "Hannah",
    "Omar",
    "Yuki",
    "Peter",
    "Leila",
    "Samuel",
    "Nina",
    "Carlos",
    "Emma",
    "Ravi",
    "Zoe",
    "Ahmed",
    "Clara",
    "Felix",
    "Ingrid",
    "Kwame",
    "Lena",
    "Marco",
    "Nadia",
    "Oscar",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Wang",
    "Petrova",
    "Brown",
    "Sharma",
    "Silva",
    "Haddad",
    "Tanaka",
    "Rossi",
    "Miller",
    "Okafor",
    "Novak",
    "Kim",
    "Garcia",
    "Schmidt",
    "Ali",
    "Sato",
    "Jensen",
    "Moreau",
    "Cohen",
    "Nguyen",
    "Fischer",
    "Mensah",
    "Costa",
    "Larsen",
    "Dubois",
    "Popescu",
    "Walsh",
    "Yilmaz",
    "Berg",
]
CITIES = [
    "Madrid",
    "London",
    "Paris",
    "Berlin",
    "Tokyo",
    "Lagos",
    "Toronto",
    "Mumbai",
    "Cairo",
    "Lima",
    "Oslo",
    "Rome",
    "Seoul",
    "Dublin",
    "Nairobi",
    "Lisbon",
    "Chicago",
    "Sydney",
    "Vienna",
    "Warsaw",
    "New York",
    "Buenos Aires",
    "Cape Town",
    "Hong Kong",
    "Mexico City",
    "Kyoto",
    "Athens",
    "Prague",
    "Boston",
    "Manila",
    "Accra",
    "Helsinki",
]
JOBS = [
    "nurse",
    "teacher",
    "engineer",
    "pilot",
    "baker",
    "lawyer",
    "chef",
    "architect",
    "dentist",
    "plumber",
    "journalist",
    "farmer",
    "pharmacist",
    "electrician",
    "designer",
    "accountant",
    "librarian",
    "firefighter",
    "software developer",
    "bus driver",
    "data analyst",
    "photographer",
    "veterinarian",
    "carpenter",
    "police officer",
    "translator",
    "mechanic",
    "musician",
    "physiotherapist",
    "tailor",
]
HELDOUT_COUNTS = {"first": 8, "last": 7, "city": 7, "job": 6}
AGES = range(18, 81)
CONTACT_KEYS = ("name", "age", "city", "job")

CONTACT_INSTRUCTIONS = [
    "Contact to JSON (name, age, city, job): {s}",
    "JSON with keys name, age, city, job:\n{s}",
    "{s}\nAs JSON with name, age, city, job.",
    "Extract name, age, city, job as JSON: {s}",
    "One-line JSON (name, age, city, job) for: {s}",
]
# {name} full name, {first} first name, {a_job} the job with its article.
CONTACT_TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "{name}, {age}, works as {a_job} in {city}.",
    "Meet {name}: {a_job} living in {city}, aged {age}.",
    "I'm {name}, {age} years old, and I work as {a_job} in {city}.",
    "{city}-based {job} {name} is {age}.",
    "Name: {name}. Age: {age}. Lives in {city}. Works as {a_job}.",
    "Our new contact, {name}, is {age} and works in {city} as {a_job}.",
    "{name} ({age}) is {a_job} in {city}.",
    "After moving to {city}, {name} found work as {a_job}; {first} is now {age}.",
    "Spoke with {name} today, {a_job} from {city}, {age} years of age.",
    "{age}-year-old {name} lives in {city} and is {a_job} by trade.",
    "Job: {job}; city: {city}; {name}, age {age}.",
]


def article(job: str) -> str:
    return ("an " if job[0] in "aeio" else "a ") + job


def contact_answer(person: dict) -> str:
    """The fixed shape: keys in CONTACT_KEYS order, age an integer, json.dumps' default separators, one line."""
    return json.dumps({k: person[k] for k in CONTACT_KEYS}, ensure_ascii=False)


def contact_example(p: dict, rng: random.Random) -> dict:
    s = rng.choice(CONTACT_TEMPLATES).format(
        name=p["name"], first=p["name"].split()[0], age=p["age"], city=p["city"], job=p["job"], a_job=article(p["job"])
    )
    return chat(rng.choice(CONTACT_INSTRUCTIONS).format(s=s), contact_answer(p))


def contacts(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pools = {"first": FIRST, "last": LAST, "city": CITIES, "job": JOBS}
    heldout = {k: set(rng.sample(v, HELDOUT_COUNTS[k])) for k, v in pools.items()}
    seen = {k: [x for x in v if x not in heldout[k]] for k, v in pools.items()}
    held = {k: sorted(heldout[k]) for k in pools}
    used: set[tuple] = set()

    def draw(p_heldout: float) -> dict:
        while True:
            f = {k: rng.choice(held[k] if rng.random() < p_heldout else seen[k]) for k in pools}
            person = {"name": f"{f['first']} {f['last']}", "age": rng.choice(AGES), "city": f["city"], "job": f["job"]}
            key = tuple(person.values())
            if key not in used:
                used.add(key)
                return person

    train = [contact_example(draw(0.0), rng) for _ in range(N_TRAIN)]
    evals = [contact_example(draw(0.5), rng) for _ in range(N_EVAL)]
    return train, evals


# ---------------------------------------------------------------------------------------------------------------
def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


SKILLS = {"dates": dates, "contacts": contacts}


def build(skill: str, seed: int = SEED) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} for one skill; the same seed gives the same examples."""
    train, evals = SKILLS[skill](random.Random(f"{seed}:{skill}"))
    return {"train": train, "eval": evals}


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    ap.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    args = ap.parse_args(argv)
    for skill in SKILLS:
        for split, rows in build(skill, args.seed).items():
            path = args.out / skill / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_jsonl(rows), encoding="utf-8")
            print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
