"""Long-context tasks generated deterministically (no data set downloads).

Each task is a list of :class:`Sample`: a prompt (already in the model's chat
format when a tokenizer is given) and the expected answer string.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answer: str
    depth: float  # where the needle sits, 0 = start, 1 = end
    context_tokens: int


def _chat(tokenizer, user: str, answer_prefix: str) -> str:
    if tokenizer is None:
        return f"{user}\n{answer_prefix}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return text + answer_prefix


def passkey(tokenizer, context_tokens: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0):
    """A 5-digit pass key hidden in filler text at each depth."""
    rng = random.Random(seed)
    filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False)) if tokenizer else 25
    repeats = max(1, context_tokens // filler_tokens)
    samples = []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        cut = int(repeats * depth)
        haystack = FILLER * cut + needle + FILLER * (repeats - cut)
        user = (
            "There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there.\n\n"
            + haystack + "\n\nWhat is the pass key? Answer with the number only."
        )
        samples.append(Sample("passkey", _chat(tokenizer, user, ""), key, depth, context_tokens))
    return samples


def multikey(tokenizer, context_tokens: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), needles: int = 4,
             seed: int = 1):
    """RULER's multi-key needle: several labelled keys in the filler, one asked for.

    The asked key sits at each depth in turn; the distractors are spread evenly.
    """
    rng = random.Random(seed)
    filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False)) if tokenizer else 25
    repeats = max(1, context_tokens // filler_tokens)
    samples = []
    for depth in depths:
        labels = rng.sample(_CITIES, needles)
        keys = [str(rng.randint(10000, 99999)) for _ in labels]
        spots = [depth] + [(depth + (i + 1) / needles) % 1.0 for i in range(needles - 1)]
        pieces = sorted(zip((int(repeats * d) for d in spots), labels, keys))
        haystack, cut = "", 0
        for at, label, key in pieces:
            haystack += FILLER * (at - cut) + f"The pass key for {label} is {key}. "
            cut = at
        haystack += FILLER * (repeats - cut)
        user = (
            "Several pass keys are hidden inside a lot of irrelevant text. Find them and "
            "memorize them. I will quiz you about them.\n\n" + haystack
            + f"\n\nWhat is the pass key for {labels[0]}? Answer with the number only."
        )
        samples.append(Sample("multikey", _chat(tokenizer, user, ""), keys[0], depth,
                              context_tokens))
    return samples


TASKS = {"passkey": passkey, "multikey": multikey}


def score(sample: Sample, output: str) -> bool:
    return sample.answer in output


_NAMES = "Ada Bruno Chen Dara Emil Farah Goran Hana Ivo Jun Kemal Lina Marco Nia Omar Priya".split()
_CITIES = "Lisbon Oslo Kyoto Quito Accra Perth Tallinn Lima Hanoi Porto Dakar Bergen".split()
_JOBS = "baker pilot nurse welder chemist farmer judge sailor tailor miner".split()


def documents(tokenizer, context_tokens: int, count: int, seed: int = 0) -> list[Sample]:
    """Long synthetic records followed by a request to summarise them (open-ended output)."""
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        lines = []
        while True:
            name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
            lines.append(f"In {rng.randint(1950, 2020)}, {name}, a {job} from {city}, "
                         f"moved {rng.randint(2, 900)} km and raised {rng.randint(1, 9)} children.")
            text = " ".join(lines)
            if tokenizer is None or len(tokenizer.encode(text)) >= context_tokens:
                break
        user = f"Records:\n{text}\n\nWrite a detailed summary of these records."
        samples.append(Sample("document", _chat(tokenizer, user, ""), "", 1.0, context_tokens))
    return samples
