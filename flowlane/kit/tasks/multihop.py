"""Multi-hop questions over a fictional world, and the corpus that describes it.

The ``search`` tool needs questions that a model cannot answer from memory: every person, town,
company, book and band here is invented (names built from syllables that form no real name), so
the only way to the answer is through the corpus. Each question needs two facts from two
passages: "In which town was the founder of Quillmere Looms born?" needs the company's passage
(founded by Orla Vendrick) and then hers (born in Tessabrook). The answer never appears in the
first passage, so one search is not enough.

The world is split in two before any question is written: people, towns and everything attached
to them belong to the train half or the test half, so a held-out question's facts never occur in
a training question (a planner cannot memorise its way to test answers). All passages of both
halves, plus distractors (festivals, rivers, near-namesake companies, people who appear in no
question), form one corpus, as a real search index would.

The shipped files under ``data/`` are produced by ``python -m flowlane.kit.tasks.multihop``;
a test regenerates them in memory and fails if they drift.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowlane.api.enums import RewardKind
from flowlane.kit.tasks.task import Split

DATA_DIR = Path(__file__).parent / "data"
CORPUS_FILE = DATA_DIR / "corpus.jsonl"
QUESTION_FILES = {Split.TRAIN: DATA_DIR / "multihop_train.jsonl", Split.TEST: DATA_DIR / "multihop_test.jsonl"}
SIZES = {Split.TRAIN: 300, Split.TEST: 80}
_SEED = 1729

# fmt: off
_FIRST_NAMES = [
    "Orla", "Tamsin", "Bram", "Ilse", "Corin", "Maren", "Tobiah", "Seren", "Wendell", "Anouk", "Per",
    "Liesel", "Caspian", "Odile", "Fenna", "Rurik", "Hester", "Jory", "Mabyn", "Teodor", "Ysolde",
    "Garrick", "Noor", "Ambrose", "Kesia", "Lorcan", "Vesna", "Elric", "Delphine", "Ansel"
]
_SURNAME_HEADS = [
    "Vend", "Quar", "Myrt", "Hollo", "Brisk", "Carv", "Dun", "Esk", "Fal", "Gorr", "Harb", "Jesp", "Kell",
    "Lunn", "Morv", "Nesb", "Ost", "Pryd", "Rusk", "Sedg", "Thorn", "Ulv", "Wend", "Yarl"
]
_SURNAME_TAILS = [
    "rick", "low", "elle", "wyn", "ard", "sley", "by", "ton", "well", "croft", "lett", "mere"
]
_TOWN_HEADS = [
    "Tessa", "Brim", "Corra", "Dovel", "Emble", "Farro", "Glen", "Harrow", "Istel", "Jarro", "Kelm",
    "Lowan", "Marra", "Nebbel", "Orrin", "Pallas", "Quen", "Rosk", "Saffel", "Tarn", "Ullow", "Varn",
    "Wistle", "Yelland", "Zenno", "Abber", "Bracket", "Cindle"
]
_TOWN_TAILS = [
    "brook", "ford", "haven", "wick", "stead", "bridge", "holm", "fell", "mouth", "gate"
]
_PROVINCES = [
    "Ardenmoor", "Calloway Reach", "Elsinwold", "Fernhallow", "Greymarch", "Luthmere"
]
_RIVERS = [
    "Sallow", "Brenna", "Idris", "Cotter", "Wenlock", "Maddery", "Torrin", "Esker", "Pollen", "Quarry"
]
_PROFESSIONS = [
    "cartographer", "glassblower", "clockmaker", "botanist", "luthier", "astronomer", "bookbinder",
    "shipwright", "perfumer", "archivist", "cooper", "engraver"
]
_BRAND_STEMS = [
    "Quillmere", "Zantrix", "Olvera", "Brackenor", "Hespera", "Lunvale", "Torvik", "Ambrel", "Cressida",
    "Dunmore", "Fennick", "Galloran", "Istrava", "Jorvale", "Kestrel", "Mallory", "Norvane", "Ostrel",
    "Pellham", "Ravelin", "Sorrento", "Tavish", "Ulmara", "Veldt", "Wyvern", "Ysmere", "Zephra", "Arnholt",
    "Belcroft", "Corvane", "Drumlin", "Eskira", "Falkner", "Gideon", "Harlow", "Ivaran", "Jessamy",
    "Kilbride", "Lorrimer", "Merrow", "Nettle", "Orsova", "Pilgrim", "Quenby", "Rowan", "Selkirk",
    "Trevane", "Umber", "Vantor", "Whitlow", "Yarrow", "Zoller", "Ashgrove", "Bramley", "Caddis", "Delmore",
    "Everly", "Foxley", "Grisham", "Hollis"
]
_COMPANY_FIELDS = [
    "Looms", "Shipping", "Optics", "Foundry", "Mills", "Instruments", "Ceramics", "Brewing", "Printworks",
    "Pharmaceuticals"
]
_COMPANY_WORK = {
    "Looms": "weaves wool and linen cloth",
    "Shipping": "runs cargo barges along the coast",
    "Optics": "grinds lenses for telescopes",
    "Foundry": "casts bells and iron fittings",
    "Mills": "grinds flour for the region's bakeries",
    "Instruments": "builds barometers and compasses",
    "Ceramics": "makes glazed tiles",
    "Brewing": "brews dark ales",
    "Printworks": "prints maps and almanacs",
    "Pharmaceuticals": "makes herbal tinctures",
}
_BOOK_ADJECTIVES = [
    "Silent", "Amber", "Hollow", "Last", "Winter", "Crooked", "Distant", "Paper", "Iron", "Seventh",
    "Quiet", "Burning"
]
_BOOK_NOUNS = [
    "Lantern", "Orchard", "Ledger", "Harbour", "Compass", "Meridian", "Tide", "Archive", "Garden", "Bell",
    "Atlas", "Cartwheel"
]
_BOOK_GENRES = [
    "novel", "memoir", "collection of essays", "travelogue", "book of poems"
]
_BAND_WORDS = [
    "Velvet", "Marrow", "Copper", "Owls", "Tin", "Lanterns", "Glass", "Foxes", "Paper", "Moths", "Amber",
    "Wolves", "Hollow", "Reeds"
]
_BAND_GENRES = [
    "folk", "jazz", "brass", "choral", "rock"
]
_SPECIALTIES = [
    "its covered market", "a stone bridge", "its spring fair", "salt marshes", "a clock tower",
    "its lace-makers", "cider orchards", "a ruined abbey"
]
# fmt: on


@dataclass
class World:
    provinces: list[str] = field(default_factory=list)
    rivers: list[str] = field(default_factory=list)
    towns: dict[str, dict[str, Any]] = field(default_factory=dict)
    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    companies: dict[str, dict[str, Any]] = field(default_factory=dict)
    books: dict[str, dict[str, Any]] = field(default_factory=dict)
    bands: dict[str, dict[str, Any]] = field(default_factory=dict)


def _unique_names(rng: random.Random, heads: list[str], tails: list[str], count: int) -> list[str]:
    pool = [h + t for h in heads for t in tails]
    rng.shuffle(pool)
    return pool[:count]


def build_world(seed: int = _SEED) -> World:
    """The invented world; every entity carries the half (train/test) it belongs to."""
    rng = random.Random(seed)
    world = World(provinces=list(_PROVINCES), rivers=list(_RIVERS))
    for name in _unique_names(rng, _TOWN_HEADS, _TOWN_TAILS, 60):
        world.towns[name] = {
            "province": rng.choice(_PROVINCES), "river": rng.choice(_RIVERS),
            "population": rng.randrange(20, 400) * 100, "specialty": rng.choice(_SPECIALTIES),
            "half": Split.TEST if len(world.towns) % 5 == 0 else Split.TRAIN,
        }  # fmt: skip
    towns = {half: [t for t, v in world.towns.items() if v["half"] is half] for half in (Split.TRAIN, Split.TEST)}
    surnames = _unique_names(rng, _SURNAME_HEADS, _SURNAME_TAILS, 150)
    for i, surname in enumerate(surnames):
        name = f"{rng.choice(_FIRST_NAMES)} {surname}"
        half = Split.TEST if i % 5 == 0 else Split.TRAIN
        world.people[name] = {
            "born_year": rng.randrange(1820, 1960), "born_in": rng.choice(towns[half]),
            "profession": rng.choice(_PROFESSIONS), "half": half,
        }  # fmt: skip
    people = {half: [p for p, v in world.people.items() if v["half"] is half] for half in (Split.TRAIN, Split.TEST)}
    # Founders, authors and singers are drawn from the same half; people never drawn stay as distractors.
    stems = list(_BRAND_STEMS)
    rng.shuffle(stems)
    for i in range(90):
        half = Split.TEST if i % 5 == 0 else Split.TRAIN
        founder = rng.choice(people[half])
        # More companies than stems: the later ones are near-namesakes of earlier ones
        # ("Quillmere Looms", "Quillmere Optics"), which makes the first search harder.
        stem = stems[i % len(stems)]
        while (name := f"{stem} {rng.choice(_COMPANY_FIELDS)}") in world.companies:
            pass
        world.companies[name] = {
            "founder": founder, "headquarters": rng.choice(towns[half]),
            "founded": world.people[founder]["born_year"] + rng.randrange(22, 55), "half": half,
        }  # fmt: skip
    for i in range(70):
        half = Split.TEST if i % 5 == 0 else Split.TRAIN
        while (title := f"The {rng.choice(_BOOK_ADJECTIVES)} {rng.choice(_BOOK_NOUNS)}") in world.books:
            pass
        author = rng.choice(people[half])
        world.books[title] = {
            "author": author, "genre": rng.choice(_BOOK_GENRES),
            "published": world.people[author]["born_year"] + rng.randrange(25, 60), "half": half,
        }  # fmt: skip
    for i in range(30):
        half = Split.TEST if i % 5 == 0 else Split.TRAIN
        band = ""
        while not band or band in world.bands:
            first, second = rng.sample(_BAND_WORDS, 2)
            band = f"The {first} {second}"
        singer = rng.choice(people[half])
        world.bands[band] = {
            "singer": singer, "formed_in": rng.choice(towns[half]), "genre": rng.choice(_BAND_GENRES),
            "formed": world.people[singer]["born_year"] + rng.randrange(17, 30), "half": half,
        }  # fmt: skip
    return world


# -- passages ---------------------------------------------------------------------------------


def _passages(world: World, rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """(kind, title, text) for every entity, then distractors."""
    for province in world.provinces:
        capital = min((t for t, v in world.towns.items() if v["province"] == province), default=None)
        count = sum(1 for v in world.towns.values() if v["province"] == province)
        text = f"{province} is a province of the Republic of Calvessa with {count} towns."
        if capital:
            text += f" Its administrative seat is {capital}."
        yield "province", province, text
    for river in world.rivers:
        passed = sorted(t for t, v in world.towns.items() if v["river"] == river)[:3]
        shown = ", ".join(passed) if passed else "no large town"
        yield "river", f"River {river}", f"The {river} is a slow lowland river of Calvessa. It passes {shown}."
    for town, v in world.towns.items():
        yield (
            "town",
            town,
            (
                f"{town} is a town in the province of {v['province']}, on the River {v['river']}. "
                f"{town} has about {v['population']:,} inhabitants and is known for {v['specialty']}."
            ),
        )
    for person, v in world.people.items():
        yield (
            "person",
            person,
            (
                f"{person} (born {v['born_year']}) is a Calvessan {v['profession']}. "
                f"{person.split()[1]} was born in {v['born_in']} in {v['born_year']}."
            ),
        )
    for company, v in world.companies.items():
        work = _COMPANY_WORK[company.split()[1]]
        yield (
            "company",
            company,
            (
                f"{company} is a company that {work}. It was founded in {v['founded']} by {v['founder']} "
                f"and has its headquarters in {v['headquarters']}."
            ),
        )
    for book, v in world.books.items():
        yield "book", book, f"{book} is a {v['genre']} by {v['author']}, first published in {v['published']}."
    for band, v in world.bands.items():
        yield (
            "band",
            band,
            (
                f"{band} are a {v['genre']} group formed in {v['formed_in']} in {v['formed']}. "
                f"Their lead singer is {v['singer']}."
            ),
        )
    # Distractors: festivals name towns and people without the facts questions ask for.
    town_names, person_names = list(world.towns), list(world.people)
    for i in range(40):
        town, guest = rng.choice(town_names), rng.choice(person_names)
        yield (
            "event",
            f"{town} Lantern Fair {1950 + i}",
            (
                f"The {1950 + i} Lantern Fair in {town} drew visitors from across the province; "
                f"{guest} opened it with a short speech."
            ),
        )


def build_corpus(world: World, seed: int = _SEED) -> list[dict[str, str]]:
    rng = random.Random(seed + 1)
    return [
        {"id": f"p{i:04d}", "title": title, "text": text, "kind": kind}
        for i, (kind, title, text) in enumerate(_passages(world, rng))
    ]


# -- questions --------------------------------------------------------------------------------


def _candidates(world: World, ids: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Every two-hop question the world supports: hop 1 names the bridge, hop 2 holds the answer."""

    def make(kind: str, question: str, answer: Any, first: str, bridge: str, half: Split) -> dict[str, Any]:
        reward = RewardKind.NUMERIC if isinstance(answer, int) else RewardKind.EXACT
        return {"type": kind, "question": question, "answer": str(answer), "reward": reward.value,
                "bridge": bridge, "gold_passages": [ids[first], ids[bridge]], "half": half}  # fmt: skip

    for company, v in world.companies.items():
        founder, half = v["founder"], v["half"]
        facts = world.people[founder]
        if facts["born_in"] != v["headquarters"]:
            yield make("founder_birthplace", f"In which town was the founder of {company} born?",
                       facts["born_in"], company, founder, half)  # fmt: skip
        yield make("founder_birth_year", f"In what year was the founder of {company} born?",
                   facts["born_year"], company, founder, half)  # fmt: skip
        yield make(
            "headquarters_province",
            f"In which province is the town where {company} has its headquarters?",
            world.towns[v["headquarters"]]["province"],
            company,
            v["headquarters"],
            half,
        )
    for book, v in world.books.items():
        author, half = v["author"], v["half"]
        yield make("author_birthplace", f"In which town was the author of {book} born?",
                   world.people[author]["born_in"], book, author, half)  # fmt: skip
        yield make("author_profession", f"What was the profession of the author of {book}?",
                   world.people[author]["profession"], book, author, half)  # fmt: skip
    for band, v in world.bands.items():
        yield make("singer_birth_year", f"In what year was the lead singer of {band} born?",
                   world.people[v["singer"]]["born_year"], band, v["singer"], v["half"])  # fmt: skip
    for person, v in world.people.items():
        yield make("birthplace_province", f"In which province is the town where {person} was born?",
                   world.towns[v["born_in"]]["province"], person, v["born_in"], v["half"])  # fmt: skip


def build_questions(world: World, corpus: list[dict[str, str]], seed: int = _SEED) -> dict[Split, list[dict]]:
    ids = {p["title"]: p["id"] for p in corpus if p["kind"] != "event"}
    text_of = {p["id"]: p["text"] for p in corpus}
    rng = random.Random(seed + 2)
    out: dict[Split, list[dict]] = {}
    for half in (Split.TRAIN, Split.TEST):
        pool = [
            c for c in _candidates(world, ids)
            if c["half"] is half and c["answer"] not in text_of[c["gold_passages"][0]]  # truly two hops
        ]  # fmt: skip
        rng.shuffle(pool)
        chosen = pool[: SIZES[half]]
        out[half] = [
            {
                "id": f"multihop-{half.value}-{i:04d}",
                "question": c["question"],
                "answer": c["answer"],
                "source": "multihop",
                "reward": c["reward"],
                "type": c["type"],
                "bridge": c["bridge"],
                "gold_passages": c["gold_passages"],
            }
            for i, c in enumerate(chosen)
        ]
    return out


def generate() -> tuple[list[dict[str, str]], dict[Split, list[dict]]]:
    world = build_world()
    corpus = build_corpus(world)
    return corpus, build_questions(world, corpus)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def rendered_files() -> dict[Path, str]:
    """The shipped data files, as text, freshly generated."""
    corpus, questions = generate()
    files = {CORPUS_FILE: _jsonl(corpus)}
    files.update({QUESTION_FILES[half]: _jsonl(rows) for half, rows in questions.items()})
    return files


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in rendered_files().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} rows)")


if __name__ == "__main__":
    main()
