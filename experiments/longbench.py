"""LongBench (v1, English tasks): the official JSONL files from a user-given directory, the
official prompt templates and answer lengths, and the official metrics.

    samples = load("path/to/LongBench/data", "hotpotqa", limit=20)
    value = score_prediction("hotpotqa", prediction, sample)      # in [0, 1]

Metric definitions follow LongBench's eval (Bai et al. 2023): a prediction's score is the
maximum over the reference answers; trec, triviaqa and samsum score only the first line of the
prediction. ROUGE-L is the `rouge` package's F value (what LongBench uses); the code similarity
is `rapidfuzz`'s ratio (the same Levenshtein ratio as fuzzywuzzy, MIT-licensed). Chinese tasks
(they need jieba) are not supported and are refused by name.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List

from mpc_llama.errors import ConfigError

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32,
                  "2wikimqa": 32, "musique": 32, "gov_report": 512, "qmsum": 512,
                  "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
                  "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum")
CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD normalisation)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: List[str], truth: List[str]) -> float:
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, truth: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def rouge_score(prediction: str, truth: str, **_) -> float:
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [truth], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):  # empty hypothesis or reference
        return 0.0


def classification_score(prediction: str, truth: str, all_classes=(), **_) -> float:
    """1/k if the true class is among the k class names found in the prediction (names that
    are substrings of the true class but not it are not counted)."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in truth and c != truth)]
    return 1.0 / len(found) if truth in found else 0.0


def retrieval_score(prediction: str, truth: str, **_) -> float:
    """Share of the numbers in the prediction equal to the true paragraph number."""
    target = re.findall(r"Paragraph (\d+)", truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, truth: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, truth: str, **_) -> float:
    """Levenshtein ratio of the first prediction line that is not a comment or fence."""
    from rapidfuzz import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, truth) / 100.0


METRICS: Dict[str, Callable[..., float]] = {
    **{d: qa_f1_score for d in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa",
                                "2wikimqa", "musique", "triviaqa")},
    **{d: rouge_score for d in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": classification_score, "passage_retrieval_en": retrieval_score,
    "passage_count": count_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def check_dataset(name: str) -> None:
    if name in CHINESE:
        raise ConfigError(f"LongBench {name} is a Chinese task (needs jieba); not supported")
    if name not in PROMPTS:
        raise ConfigError(f"unknown LongBench dataset {name!r}; choose from {sorted(PROMPTS)}")


def datasets_in(directory: str) -> List[str]:
    """The supported datasets with a NAME.jsonl file in `directory`, in PROMPTS order.
    Raises ConfigError if the directory does not exist or holds none of them."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"LongBench directory {d} not found (give --longbench the directory "
                          "holding the official data/*.jsonl files)")
    names = [n for n in PROMPTS if (d / f"{n}.jsonl").is_file()]
    if not names:
        raise ConfigError(f"{d} holds no LongBench file of a supported dataset "
                          f"(NAME.jsonl, NAME from {sorted(PROMPTS)})")
    return names


def load(directory: str, name: str, limit: int = 0) -> List[dict]:
    """The first `limit` (0 = all) records of DIR/NAME.jsonl: dicts with context, input,
    answers, all_classes (official LongBench fields)."""
    check_dataset(name)
    path = Path(directory) / f"{name}.jsonl"
    if not path.is_file():
        raise ConfigError(f"LongBench file {path} not found (give --longbench the directory "
                          "holding the official data/*.jsonl files)")
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append({"context": rec["context"], "input": rec.get("input", ""),
                            "answers": list(rec["answers"]),
                            "all_classes": rec.get("all_classes") or []})
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n}: not a LongBench record ({e})") from None
            if limit and len(out) >= limit:
                break
    if not out:
        raise ConfigError(f"{path} holds no records")
    return out


def prompt_text(name: str, record: dict) -> str:
    return PROMPTS[name].format(context=record["context"], input=record["input"])


def score_prediction(name: str, prediction: str, record: dict) -> float:
    """LongBench's score of one prediction, in [0, 1]: max over the reference answers."""
    if name in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[name]
    return max(metric(prediction, truth, all_classes=record["all_classes"])
               for truth in record["answers"])
