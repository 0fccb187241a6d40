"""Haystacks for the long-context tasks, generated offline and seeded.

    noise   RULER's repeated filler ("The grass is green. The sky is blue. ..."): every
            cluster but the needle's looks the same (the reference setting).
    varied  everyday sentences drawn from many subjects, verbs, objects, places, times and
            sentence shapes: no two neighbouring clusters look alike.
    prose   prose-like narrative paragraphs: recurring characters, pronouns, subordinate
            clauses and dialogue. Generated, not quoted: no public-domain text ships inside
            an installed package here (nltk's corpora are a separate download), so this is
            a stand-in for natural prose, seeded like the rest.
No haystack contains a digit, so a number in the prompt is a needle's.
"""

from __future__ import annotations

import random
from typing import Iterator, List, Tuple

from mpc_llama.errors import ConfigError

HAYSTACKS = ("noise", "varied", "prose")

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")

SUBJECTS = (
    "My neighbour", "The old fisherman", "A tired nurse", "The baker on the corner", "Our teacher",
    "A young architect", "The mayor", "My grandmother", "The bus driver", "A curious child",
    "The librarian", "Two students", "The gardener", "A retired sailor", "The night guard",
    "My cousin", "The new manager", "A street musician", "The village doctor", "The chef",
    "A local farmer", "The postman", "Her brother", "The painter", "A quiet engineer",
    "The shopkeeper", "Our landlord", "A group of hikers", "The pilot", "The carpenter",
    "A visiting professor", "The waitress", "His sister", "The florist", "A nervous actor",
    "The photographer", "My best friend", "The tailor", "A lonely widower", "The coach",
)
VERBS = (
    "painted", "repaired", "carried", "forgot", "borrowed", "cleaned", "sold", "bought",
    "found", "lost", "wrapped", "polished", "measured", "photographed", "described",
    "returned", "hid", "delivered", "admired", "ignored", "moved", "opened", "locked",
    "weighed", "sketched", "packed", "inspected", "replaced", "donated", "decorated",
)
OBJECTS = (
    "a wooden chair", "the broken clock", "an old umbrella", "a basket of pears",
    "the blue bicycle", "a leather suitcase", "the kitchen window", "a pair of boots",
    "the brass lamp", "a stack of letters", "the garden fence", "a silk scarf",
    "the violin case", "a jar of honey", "the front door", "a map of the coast",
    "the iron kettle", "a bundle of firewood", "the red scooter", "a heavy blanket",
    "the glass vase", "a box of candles", "the piano bench", "a woollen sweater",
    "the fishing net", "a cracked mirror", "the tool chest", "a set of keys",
    "the birdcage", "a paper kite", "the cookbook", "a pot of tulips",
)
PLACES = (
    "near the station", "behind the church", "at the market", "in the attic",
    "by the river", "outside the bakery", "in the hospital corridor", "on the ferry",
    "at the edge of town", "in the school yard", "under the bridge", "at the harbour",
    "in the museum", "beside the lake", "on the top floor", "in the greenhouse",
    "at the train depot", "in the old mill", "near the lighthouse", "in the town square",
    "at the petrol station", "in the library basement", "on the mountain path",
    "at the football ground", "in the village hall", "by the fountain",
)
TIMES = (
    "on Tuesday morning", "after lunch", "before sunrise", "late last night",
    "during the storm", "at the weekend", "on a rainy afternoon", "just before dinner",
    "in early spring", "last winter", "after the concert", "on her birthday",
    "during the holidays", "at dawn", "in the middle of the week", "once the shops closed",
)
FEELINGS = ("happy", "annoyed", "surprised", "worried", "proud", "relieved", "puzzled",
            "delighted", "bored", "curious", "embarrassed", "calm")
REASONS = (
    "because it was raining", "since nobody else would", "to please a friend",
    "without telling anyone", "for a small fee", "as a favour", "out of habit",
    "on the advice of a stranger", "to save some money", "just for fun",
)
SHAPES = (
    "{S} {V} {O} {P} {T}.",
    "{T}, {s} {V} {O} {P}.",
    "{S} was {F} after {ving} {O} {P}.",
    "Nobody knows why {s} {V} {O} {T}.",
    "{P}, {s} {V} {O} {R}.",
    "{S} {V} {O} and then {V2} {O2}.",
    "It was {T} when {s} {V} {O}.",
    "{S} said that {O} {P} looked {F2} {T}.",
)

NAMES = ("Edith", "Tomas", "Margaret", "Arthur", "Lena", "Victor", "Clara", "Henry", "Rosa",
         "Julian", "Agnes", "Felix", "Ida", "Oscar", "Nora", "Samuel")
OBJECT_PRONOUN = {"she": "her", "he": "him"}
PRONOUN = {"Edith": "she", "Tomas": "he", "Margaret": "she", "Arthur": "he", "Lena": "she",
           "Victor": "he", "Clara": "she", "Henry": "he", "Rosa": "she", "Julian": "he",
           "Agnes": "she", "Felix": "he", "Ida": "she", "Oscar": "he", "Nora": "she",
           "Samuel": "he"}
WEATHER = ("the wind rose over the hills", "a thin rain began to fall", "the fog lifted slowly",
           "the sun sank behind the roofs", "the snow muffled every step",
           "the evening grew cold and still", "clouds gathered above the valley")
THOUGHTS = ("the letter that had never been answered", "the summer spent at the coast",
            "a promise made long ago", "the quarrel with an old friend",
            "the house where the family had lived", "the journey still ahead",
            "the strange visitor of the previous week", "the debts that had to be paid")
SAYINGS = ("We should not wait any longer", "I never liked this road", "Tell me what you saw",
           "It will be better in the morning", "You were right about the river",
           "Nobody has to know", "Let us go before it gets dark", "I thought you had left")
ACTIONS = ("walked along the empty lane", "sat by the window of the inn",
           "climbed the narrow stairs", "waited at the gate of the orchard",
           "crossed the square without looking back", "stood at the edge of the pier",
           "opened the shutters of the kitchen", "followed the path into the woods")
LINKS = ("For a long while", "At last", "Meanwhile", "Later that evening", "In the end",
         "All the same", "Without a word", "Some time afterwards")


def _ing(verb: str) -> str:
    base = {"hid": "hiding", "forgot": "forgetting", "sold": "selling", "bought": "buying",
            "found": "finding", "lost": "losing", "carried": "carrying"}.get(verb)
    if base:
        return base
    stem = verb[:-1] if verb.endswith("ed") else verb    # "painted" -> "painte"
    stem = stem[:-1] if stem.endswith("e") and not stem.endswith("ee") else stem
    return stem[:-1] + "ying" if stem.endswith("i") else stem + "ing"


def varied_sentences(rng: random.Random) -> Iterator[str]:
    """Endless everyday sentences, each of a random shape and random parts (no digits)."""
    while True:
        subj = rng.choice(SUBJECTS)
        verb = rng.choice(VERBS)
        text = rng.choice(SHAPES).format(
            S=subj, s=subj[0].lower() + subj[1:],
            V=verb, V2=rng.choice(VERBS), ving=_ing(verb), O=rng.choice(OBJECTS),
            O2=rng.choice(OBJECTS), P=rng.choice(PLACES), T=rng.choice(TIMES),
            F=rng.choice(FEELINGS), F2=rng.choice(FEELINGS), R=rng.choice(REASONS))
        yield text[0].upper() + text[1:]


def prose_sentences(rng: random.Random) -> Iterator[str]:
    """Endless narrative: paragraphs of three to six linked sentences about one character."""
    while True:
        name = rng.choice(NAMES)
        he = PRONOUN[name]
        other = rng.choice([n for n in NAMES if n != name])
        parts = [f"{name} {rng.choice(ACTIONS)} as {rng.choice(WEATHER)}."]
        for _ in range(rng.randint(2, 5)):
            kind = rng.randrange(4)
            if kind == 0:
                parts.append(f"{rng.choice(LINKS)}, {he} thought about "
                             f"{rng.choice(THOUGHTS)}, and {he} felt {rng.choice(FEELINGS)}.")
            elif kind == 1:
                parts.append(f"\"{rng.choice(SAYINGS)},\" {he} told {other}, who only nodded.")
            elif kind == 2:
                parts.append(f"{other} had {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                             f"{rng.choice(PLACES)}, although nobody had asked "
                             f"{OBJECT_PRONOUN[PRONOUN[other]]} "
                             "to.")
            else:
                parts.append(f"{rng.choice(LINKS)}, {he} {rng.choice(ACTIONS)}, "
                             f"{rng.choice(REASONS)}.")
        parts[-1] += "\n"
        yield from parts


def fill(tokenizer, n: int, haystack: str = "noise",
         rng: random.Random = None) -> Tuple[List[int], List[int]]:
    """Exactly n token ids of `haystack` and the offsets where its sentences start (a needle
    placed there does not split a word). "noise" repeats RULER's unit, as before (its offsets
    are every unit start); the others encode one sentence at a time, seeded by `rng`."""
    if haystack not in HAYSTACKS:
        raise ConfigError(f"unknown haystack {haystack!r}; choose from {HAYSTACKS}")
    if haystack == "noise":
        unit = tokenizer.encode_piece(NOISE)
        reps = -(-n // max(1, len(unit)))
        return (unit * reps)[:n], list(range(0, n, max(1, len(unit))))
    rng = rng or random.Random(0)
    gen = varied_sentences(rng) if haystack == "varied" else prose_sentences(rng)
    ids: List[int] = []
    starts: List[int] = []
    while len(ids) < n:
        starts.append(len(ids))
        ids += tokenizer.encode_piece(" " + next(gen))
    return ids[:n], starts


def text(tokenizer, n: int, haystack: str, seed: int = 0) -> str:
    """About n tokens of a haystack as text (for generate.py prompts and a look by eye)."""
    return tokenizer.decode(fill(tokenizer, n, haystack, random.Random(seed))[0])
