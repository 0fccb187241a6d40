"""RULER-style long-context tasks, generated offline and seeded, at an exact token length.

Every sample is built from token pieces (instruction, a noise haystack, needles at a requested
depth, the question, an answer prefix in the assistant turn), so its prompt is exactly
`length` tokens: one jit-compiled prefill serves every sample of that length. The haystack
(`experiments.haystacks`, no data files) is RULER's noise ("The grass is green. The sky is
blue. ...", the default), varied everyday sentences, or generated prose; on the latter two
needles are placed at sentence starts.

Tasks (RULER names in brackets):
    passkey            one 5-digit pass key in the noise                        [passkey]
    niah_single        one "special magic number" for a key                     [niah_single_1]
    niah_multikey      one needle asked for among 4 with other keys             [niah_multikey_1]
    niah_multivalue    4 values for the same key, all asked                     [niah_multivalue]
    variable_tracking  a chain VAR A = 12345, VAR B = VAR A, ...: name them all  [vt]
    common_words       a word list: the 10 most frequent words                  [cwe]
    passphrase         a four-word passphrase (an answer of several words)
    record             three facts in one needle: a 5-digit code, a colour, a place
Needles span more than one 16-token cluster: a 5-digit code alone is 5 tokens, a record ~35.
Score: the fraction of expected answers found in the output (RULER's string_match_all).

Two protocols: "inside" (the question ends the prompt, so a static eviction step sees it) and
"after" (the prompt ends with the context; the question arrives after the cache was
compressed, fed token by token through decode steps).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Dict, List, Sequence, Tuple

from experiments.haystacks import HAYSTACKS, NOISE, fill  # noqa: F401  (NOISE: old name)
from mpc_llama.errors import ConfigError

KEY_WORDS = (
    "apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "saddle", "thunder", "velvet",
    "walnut", "anchor", "bamboo", "canyon", "dolphin", "ember", "feather", "glacier", "hazel",
    "ivory", "jungle", "kernel", "lagoon", "marble", "nectar", "oyster", "pebble", "quiver",
    "raven", "silver", "tulip", "umbrella", "violet", "willow", "yarrow", "zephyr", "bridge",
    "copper", "desert", "engine", "forest", "granite", "hollow", "insect", "jasmine", "koala",
    "ladder", "mirror", "nutmeg", "object", "parrot", "rocket", "spider", "tunnel", "valley",
    "wagon", "basket", "cactus", "dragon", "eagle", "fabric", "goblet", "helmet", "icicle",
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated prompt.

    pieces: (instruction, context, question) token id lists; prompt_ids: the full prompt
    (chat-formatted, answer prefix included) for protocol "inside"; context_ids and
    question_ids split it for protocol "after"; answers: strings the output must contain;
    needle_spans: [start, end) token positions of every needle in prompt_ids (and in
    context_ids, which starts the same); depth: where the (first) needle sits, 0..1.
    """

    task: str
    prompt_ids: Tuple[int, ...]
    context_ids: Tuple[int, ...]
    question_ids: Tuple[int, ...]
    answers: Tuple[str, ...]
    needle_spans: Tuple[Tuple[int, int], ...]
    depth: float
    max_new_tokens: int


def score(task: str, output: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` found in `output` (case-insensitive), as RULER scores."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _keys(rng: random.Random, n: int) -> List[str]:
    return rng.sample(KEY_WORDS, n)


# ---- task contents: (instruction, needles, question, answer prefix, answers, new tokens) ----

def _passkey(rng):
    key = _number(rng, 5)
    return ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the pass key.",
            [f" The pass key is {key}. Remember it. {key} is the pass key."],
            "What is the pass key? Answer with the number only.", "The pass key is",
            [key], 10)


def _niah(rng, n_keys: int, n_values: int, ask: int = 0):
    keys = _keys(rng, n_keys)
    values = {k: [_number(rng, 7) for _ in range(n_values if i == ask else 1)]
              for i, k in enumerate(keys)}
    needles = [f" One of the special magic numbers for {k} is: {v}." for k in keys
               for v in values[k]]
    key = keys[ask]
    many = n_values > 1
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         "Answer with the numbers only." if many else
         f"What is the special magic number for {key} mentioned in the provided text? "
         "Answer with the number only.")
    prefix = (f"The special magic numbers for {key} mentioned in the provided text are" if many
              else f"The special magic number for {key} mentioned in the provided text is")
    return ("Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.",
            needles, q, prefix, values[key], 12 * n_values)


def _variable_tracking(rng, hops: int = 4):
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
             for _ in range(hops + 1)]
    value = _number(rng, 5)
    needles = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}."
                                                   for i in range(1, hops + 1)]
    return ("Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.",
            needles,
            f"Find all variables that are assigned the value {value} in the text above. "
            "Answer with the variable names only.",
            f"Answer: According to the chain(s) of variable assignment in the text above, "
            f"{hops + 1} variables are assigned the value {value}, they are:",
            names, 8 * (hops + 1))


COLOURS = ("crimson", "turquoise", "amber", "lavender", "scarlet", "olive", "indigo", "maroon")


def _plain_words():
    """KEY_WORDS that no haystack uses (an output word then comes from the needle)."""
    import experiments.haystacks as h

    used = " ".join(" ".join(getattr(h, n)) for n in dir(h) if n.isupper() and
                    isinstance(getattr(h, n), tuple) and n != "HAYSTACKS").lower()
    used += " remember passphrase secret visitor locker badge colour meeting point gate note"
    return [w for w in KEY_WORDS if w not in used]


def _passphrase(rng):
    words = rng.sample(_plain_words(), 4)
    phrase = " ".join(words)
    return ("There is a secret passphrase hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the passphrase.",
            [f" The secret passphrase is {phrase}. Remember it."],
            "What is the secret passphrase? Answer with the four words only.",
            "The secret passphrase is", words, 16)


def _record(rng):
    key, place = rng.sample(_plain_words(), 2)
    code, colour = _number(rng, 5), rng.choice(COLOURS)
    return ("A note about a visitor is hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the note.",
            [f" Note about the visitor {key}: the locker code is {code}, the badge colour is "
             f"{colour}, and the meeting point is the {place} gate."],
            f"For the visitor {key}, what are the locker code, the badge colour and the "
            "meeting point? Answer briefly.",
            f"For the visitor {key}, the locker code is", [code, colour, place], 32)


TASKS: Dict[str, Callable] = {
    "passkey": _passkey,
    "niah_single": lambda rng: _niah(rng, 1, 1),
    "niah_multikey": lambda rng: _niah(rng, 4, 1, ask=rng.randrange(4)),
    "niah_multivalue": lambda rng: _niah(rng, 1, 4),
    "variable_tracking": _variable_tracking,
    "common_words": None,  # built by _common_words (its context is the word list itself)
    "passphrase": _passphrase,
    "record": _record,
}


def _fill(tokenizer, n: int) -> List[int]:
    """Exactly n token ids of noise haystack."""
    return fill(tokenizer, n)[0]


def _chat_pieces(tokenizer, user_before: str, user_after: str, prefix: str):
    """Token ids around the context: (head, tail_question): head = chat header + text before
    the context; tail = text after it + end of user turn + assistant header + answer prefix."""
    marker = "\u0000CONTEXT\u0000"
    text = tokenizer.chat_text(user_before + marker + user_after) + prefix
    before, after = text.split(marker)
    return tokenizer.encode_start(before), tokenizer.encode_piece(after)


def generate(task: str, tokenizer, length: int, depth: float, seed: int,
             haystack: str = "noise") -> Sample:
    """One sample of `task` whose prompt is exactly `length` tokens, needles at `depth`, in
    `haystack` (noise | varied | prose). The needles, question and answers depend on (task,
    length, depth, seed) only: the same across haystacks."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ConfigError(f"unknown haystack {haystack!r}; choose from {HAYSTACKS}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    if task == "common_words":
        return _common_words(tokenizer, length, rng, depth)
    instruction, needles, question, prefix, answers, new_tokens = TASKS[task](rng)
    head, tail = _chat_pieces(tokenizer, instruction + "\n\n", "\n\n" + question, " " + prefix)
    needle_ids = [tokenizer.encode_piece(n) for n in needles]
    room = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
    if room < 16:
        raise ConfigError(f"length {length} is too short for task {task}")
    hay, starts = fill(tokenizer, room, haystack,
                       random.Random(f"{haystack}:{task}:{length}:{depth}:{seed}"))
    # needles spread from `depth` on (RULER puts multi-needles at evenly spaced depths)
    cuts = sorted(min(room, int(round(room * (depth + (1 - depth) * i / len(needle_ids)))))
                  for i in range(len(needle_ids)))
    if haystack != "noise":  # at the sentence start nearest each cut (noise: as before)
        cuts = [min(starts + [room], key=lambda s: abs(s - c)) for c in cuts]
    context, spans, prev = [], [], 0
    for cut, ids in zip(cuts, needle_ids):
        context += hay[prev:cut]
        spans.append((len(head) + len(context), len(head) + len(context) + len(ids)))
        context += ids
        prev = cut
    context += hay[prev:]
    prompt = head + context + tail
    assert len(prompt) == length
    return Sample(task, tuple(prompt), tuple(head + context), tuple(tail), tuple(answers),
                  tuple(spans), depth, new_tokens)


def _common_words(tokenizer, length: int, rng: random.Random, depth: float) -> Sample:
    """RULER's cwe: a numbered word list in which 10 words appear many times and the rest
    once or twice; which are the 10 most common? (depth does not apply)."""
    common = rng.sample(KEY_WORDS, 10)
    rare_pool = [w for w in KEY_WORDS if w not in common]
    head, tail = _chat_pieces(
        tokenizer, "Below is a numbered list of words. In these words, some appear more often "
        "than others. Memorize the ones that appear most often.\n",
        "\nQuestion: What are the 10 most common words in the above list? Answer with the "
        "words only.", " Answer: The top 10 words that appear most often in the list are:")
    room = length - len(head) - len(tail)
    words: List[str] = []
    pieces: List[int] = []
    counts = {w: 0 for w in KEY_WORDS}
    i = 1
    while True:
        pick = rng.choice(common) if rng.random() < 0.55 else rng.choice(rare_pool)
        if pick in rare_pool and counts[pick] >= 2:
            pick = rng.choice(common)
        ids = tokenizer.encode_piece(f" {i}. {pick}")
        if len(pieces) + len(ids) > room:
            break
        pieces += ids
        words.append(pick)
        counts[pick] += 1
        i += 1
    pieces += _fill(tokenizer, room - len(pieces))[:room - len(pieces)]
    prompt = head + pieces + tail
    assert len(prompt) == length
    return Sample("common_words", tuple(prompt), tuple(head + pieces), tuple(tail),
                  tuple(common), (), depth, 40)
