"""Haystack generators: seeded, deterministic, offline, exact lengths; tasks on each haystack."""

import random
import re

import pytest

from experiments import haystacks, tasks
from mpc_llama.errors import ConfigError


class WordTokenizer:
    """One id per whitespace-separated word (ids from a growing vocabulary): no model needed."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def encode_piece(self, text):
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            out.append(self.vocab[w])
        return out

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@pytest.fixture(scope="module")
def tok(built_tokenizer):
    """SmolLM2's tokenizer, read back from the run's cache (built once by `built_tokenizer`)."""
    from mpc_llama.loading import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.mark.parametrize("kind", haystacks.HAYSTACKS)
@pytest.mark.parametrize("n", [1, 37, 500, 2000])
def test_fill_hits_the_length_and_is_seeded(kind, n):
    t = WordTokenizer()
    ids, starts = haystacks.fill(t, n, kind, random.Random(5))
    assert len(ids) == n
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < n
    assert ids == haystacks.fill(t, n, kind, random.Random(5))[0]
    if kind != "noise" and n >= 500:
        assert ids != haystacks.fill(t, n, kind, random.Random(6))[0]


@pytest.mark.parametrize("kind", ["varied", "prose"])
def test_natural_haystacks_vary_and_hold_no_digits(kind):
    t = WordTokenizer()
    ids, _ = haystacks.fill(t, 3000, kind, random.Random(1))
    text = t.decode(ids)
    assert not re.search(r"\d", text)
    # neighbouring 16-word windows never repeat (the noise repeats every 20 words)
    windows = [tuple(ids[i:i + 16]) for i in range(0, len(ids) - 16, 16)]
    assert all(a != b for a, b in zip(windows, windows[1:]))
    assert len(set(windows)) == len(windows)
    assert len(set(ids)) > 150                      # many subjects, verbs, objects, places
    noise = haystacks.fill(t, 3000, "noise")[0]
    assert len(set(noise)) < 20


def test_unknown_haystack_is_rejected(tok):
    with pytest.raises(ConfigError, match="unknown haystack"):
        haystacks.fill(WordTokenizer(), 10, "lorem")
    with pytest.raises(ConfigError, match="unknown haystack"):
        tasks.generate("passkey", tok, 512, 0.5, 0, haystack="lorem")


def test_noise_is_unchanged(tok):
    """The noise haystack is the one the earlier results used."""
    unit = tok.encode_piece(tasks.NOISE)
    assert haystacks.fill(tok, 1000)[0] == (unit * (1000 // len(unit) + 1))[:1000]


@pytest.mark.parametrize("kind", haystacks.HAYSTACKS)
@pytest.mark.parametrize("task", ["passkey", "passphrase", "record", "niah_multikey"])
def test_tasks_on_every_haystack(tok, kind, task):
    s = tasks.generate(task, tok, 1024, 0.3, seed=2, haystack=kind)
    assert len(s.prompt_ids) == 1024
    assert s == tasks.generate(task, tok, 1024, 0.3, seed=2, haystack=kind)   # seeded
    # needles, question and answers do not depend on the haystack
    assert s.answers == tasks.generate(task, tok, 1024, 0.3, seed=2).answers
    assert s.question_ids == tasks.generate(task, tok, 1024, 0.3, seed=2).question_ids
    prompt = tok.decode(list(s.prompt_ids))
    for a in s.answers:
        assert a in prompt
    needles = " ".join(tok.decode(list(s.prompt_ids[a:b])) for a, b in s.needle_spans)
    assert all(ans in needles for ans in s.answers)
    for a, b in s.needle_spans:
        if kind != "noise":   # needles start at a sentence start: no word cut in two
            before = tok.decode(list(s.prompt_ids[a - 3:a]))
            assert before.rstrip()[-1] in '.!?"\n' or before.endswith("\n")


def test_multi_cluster_needles(tok):
    """The new tasks' answers are several values; a record spans more than one 16-token
    cluster, a passphrase often does."""
    for task, least in (("passphrase", 10), ("record", 17)):
        s = tasks.generate(task, tok, 1024, 0.5, seed=0, haystack="varied")
        a, b = s.needle_spans[0]
        assert b - a >= least
        assert len(s.answers) >= 3
    assert tasks.score("record", "is 12345, the badge colour is amber", ["12345", "amber",
                                                                          "walnut"]) == 2 / 3


def test_haystack_cli_parsing():
    from experiments.run_accuracy import task_haystacks, task_label

    assert task_haystacks(["passkey", "record@prose"], ["noise", "varied"]) == [
        ("passkey", "noise"), ("passkey", "varied"), ("record", "prose")]
    assert task_label("passkey", "noise") == "passkey"
    assert task_label("passkey", "varied") == "passkey@varied"
    for tasks_, hays, msg in ((["passkey"], ["lorem"], "unknown haystack"),
                              (["passkey@lorem"], ["noise"], "unknown haystack"),
                              (["nope@varied"], ["noise"], "unknown task")):
        with pytest.raises(ConfigError, match=msg):
            task_haystacks(tasks_, hays)
