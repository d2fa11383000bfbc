"""Long-context tasks generated deterministically (no data set downloads).

Each task is a list of :class:`Sample`: a prompt (already in the model's chat
format when a tokenizer is given) and the expected answer string(s). Every
generator in :data:`TASKS` is ``f(tokenizer, context_tokens, depths=..., seed=...)``
and gives one sample per depth; the question is always the prompt's last
paragraph (after a blank line), the part kvpress keeps apart.

RULER-style tasks (Hsieh et al., 2024), the first two unchanged since the first
results were measured; :func:`score` is RULER's string match (the share of a
sample's answers found):

* ``passkey``: a 5-digit pass key hidden in filler text.
* ``multikey``: four labelled pass keys in the filler, one asked for (MK-NIAH).
* ``multivalue``: one label with four pass keys spread through the filler, all asked
  for (MV-NIAH).
* ``kvretrieval``: a JSON object of UUID keys and values, no filler; the value of
  one key asked for.
* ``vartrack``: a chain of five variables (``VAR A = 12345``, ``VAR B = VAR A``, ...,
  four hops) in the filler; every variable holding the value asked for.
* ``commonwords``: a numbered list of words, ten of them frequent; the ten asked for
  (CWE).
* ``qa``: records of people, each moving to a city; the city one person moved to
  asked for.

The new tasks size their prompt with the tokenizer to within a few tokens of
``context_tokens`` (chat template included); without one, ~3.6 characters a token.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answer: str  # the needle at ``depth`` (the whole answer for one-answer tasks)
    depth: float  # where the needle sits, 0 = start, 1 = end
    context_tokens: int
    answers: tuple[str, ...] = ()  # what a correct output contains; () means (answer,)
    max_tokens: int = 12  # room the answer needs when generated

    def __post_init__(self):
        if not self.answers:
            object.__setattr__(self, "answers", (self.answer,))


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


def score(sample: Sample, output: str) -> float:
    """RULER's string match, case aside: the share of ``sample.answers`` found in ``output``.

    1 or 0 for the one-answer tasks (for ``passkey`` and ``multikey``,
    ``sample.answer in output``, as it always was); for the tasks with several
    answers (multivalue, vartrack, commonwords) the fraction found, RULER's
    ``string_match_all``, so a small model that finds two of four values scores 0.5.
    """
    text = output.lower()
    return sum(answer.lower() in text for answer in sample.answers) / len(sample.answers)


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


# --- RULER-style tasks sized with the tokenizer -----------------------------------------

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

_SURNAMES = (
    "Abara", "Berg", "Castillo", "Dorsey", "Eklund", "Fischer", "Garza", "Holm", "Ibsen",
    "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi",
    "Sato", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz"
)
_TOWNS = (
    "Ankara", "Belgrade", "Cairo", "Cusco", "Dublin", "Geneva", "Havana", "Jakarta", "Kampala",
    "Krakow", "Lagos", "Luanda", "Madrid", "Manila", "Nairobi", "Naples", "Odessa", "Palermo",
    "Prague", "Riga", "Santiago", "Seville", "Sofia", "Tbilisi", "Toronto", "Tunis", "Turin",
    "Valencia", "Vienna", "Warsaw", "Zagreb", "Zurich", "Bogota", "Denver", "Glasgow", "Hamburg",
    "Muscat", "Osaka", "Tehran", "Yerevan"
)
# No word is a substring of another, nor of the instructions around the list.
_WORDS = (
    "apple", "anchor", "badge", "banjo", "barrel", "basket", "beacon", "bottle", "bucket",
    "butter", "cabin", "camel", "candle", "canoe", "carpet", "castle", "cellar", "cherry",
    "chimney", "clover", "cobra", "comet", "copper", "cotton", "crayon", "cricket", "curtain",
    "dagger", "daisy", "desert", "dolphin", "donkey", "dragon", "drum", "eagle", "elbow", "engine",
    "falcon", "feather", "fiddle", "flute", "forest", "fossil", "fountain", "garlic", "ginger",
    "glacier", "goblet", "granite", "guitar", "hammer", "harbor", "helmet", "hermit", "honey",
    "hornet", "island", "ivory", "jacket", "jaguar", "jelly", "jungle", "kettle", "kitten",
    "ladder", "lantern", "lemon", "leopard", "lizard", "lobster", "magnet", "mango", "marble",
    "meadow", "melon", "mirror", "monkey", "mosaic", "muffin", "mustard", "needle", "nickel",
    "noodle", "oyster", "paddle", "palace", "panda", "parrot", "peanut", "pebble", "pencil",
    "pepper", "piano", "pickle", "pigeon", "pillow", "pirate", "planet", "pocket", "potato",
    "pretzel", "puppet", "pumpkin", "quilt", "rabbit", "radish", "raven", "ribbon", "rocket",
    "saddle", "salmon", "sandal", "saucer", "scarf", "shovel", "silver", "skate", "sofa", "spider",
    "spoon", "squid", "statue", "stove", "sugar", "summer", "tablet", "tiger", "timber", "tomato",
    "trumpet", "tulip", "turtle", "umbrella", "valley", "velvet", "violin", "walnut", "wagon",
    "walrus", "whistle", "willow", "window", "wizard", "yogurt", "zebra", "acorn", "almond",
    "antler", "apron", "arrow", "avocado", "bamboo", "bandit", "beetle", "biscuit", "blanket",
    "blossom", "bonnet", "bramble", "bridge", "broom", "bubble", "buffalo", "cactus", "canyon",
    "caramel", "carrot", "cashew", "cedar", "chalk", "cheetah", "chisel", "cider", "cinnamon",
    "citrus", "cobalt", "coconut", "compass", "cookie", "coral", "cradle", "crater", "crystal",
    "cupcake", "cypress", "denim", "diamond", "dinosaur", "dune", "emerald", "falafel", "ferry",
    "fjord", "flamingo", "forklift", "fudge", "galaxy", "gazelle", "geyser", "giraffe", "gondola",
    "gorilla", "grape", "gravel", "hamster", "harp", "hazel", "hedgehog", "hippo", "hobbit",
    "iceberg", "igloo", "iguana", "jasmine", "jigsaw", "kayak", "kiwi", "koala", "lagoon", "lava",
    "lettuce", "lilac", "llama", "locket", "lotus", "lychee", "mammoth", "maple", "meteor",
    "mitten", "moose", "mushroom", "nectar", "nutmeg", "oasis", "octopus", "olive", "orchid",
    "otter", "owl", "pagoda", "papaya", "peacock", "pelican", "penguin", "pinecone", "pistachio",
    "plum", "poodle", "porcupine", "prism", "quartz", "quince", "raccoon", "raisin", "reindeer",
    "rhino", "saffron", "sapphire", "scooter", "seashell", "sequoia", "sherbet", "shrimp", "sloth",
    "snail", "squirrel", "sunflower", "swan", "taco", "tambourine", "teapot", "thistle", "toucan",
    "trolley", "truffle", "tundra", "turnip", "unicorn", "vanilla", "vulture", "waffle", "wasp",
    "weasel", "whale", "yacht", "zucchini"
)
_CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"


def _count(tokenizer, text: str) -> int:
    """Tokens in a rendered prompt (template included); ~3.6 characters a token without one."""
    if tokenizer is None:
        return round(len(text) / 3.6)
    return len(tokenizer.encode(text, add_special_tokens=False))


def _fit(tokenizer, context_tokens: int, build, low: int = 16, high: int = 64):
    """``build(n)`` for the ``n`` whose prompt is closest to ``context_tokens``.

    ``build(n) -> (prompt, ...)`` grows about linearly in ``n`` (filler repeats,
    records, list entries); two probes give the slope, a few steps correct it.
    """
    base, top = _count(tokenizer, build(low)[0]), _count(tokenizer, build(high)[0])
    per = max((top - base) / (high - low), 1e-3)
    n = max(1, low + round((context_tokens - base) / per))
    seen = {}
    for _ in range(4):
        if n in seen:
            break
        seen[n] = build(n)
        step = round((context_tokens - _count(tokenizer, seen[n][0])) / per)
        if step == 0:
            break
        n = max(1, n + step)
    best = min(seen, key=lambda k: abs(_count(tokenizer, seen[k][0]) - context_tokens))
    return seen[best]


def _filler(pieces, repeats: int) -> str:
    """Filler with each ``(depth, text)`` of ``pieces`` inserted at ``int(repeats * depth)``.

    Pieces at the same spot keep their order in ``pieces``.
    """
    at = sorted(((int(repeats * d), i, text) for i, (d, text) in enumerate(pieces)))
    haystack, cut = "", 0
    for spot, _, text in at:
        haystack += FILLER * (spot - cut) + text
        cut = spot
    return haystack + FILLER * (repeats - cut)


def multivalue(tokenizer, context_tokens: int, depths=DEPTHS, values: int = 4, seed: int = 2):
    """RULER's multi-value needle: one label with ``values`` pass keys, all of them asked for.

    The first value sits at the depth, the others evenly spread after it (wrapping
    round to the start). Correct: every value in the output.
    """
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        label = rng.choice(_CITIES)
        keys = [str(k) for k in rng.sample(range(10000, 100000), values)]
        spots = [(depth + i / values) % 1.0 for i in range(values)]
        pieces = [(d, f"One of the pass keys for {label} is {k}. ") for d, k in zip(spots, keys)]

        def build(repeats, pieces=pieces, label=label):
            user = ("Several pass keys are hidden inside a lot of irrelevant text. Find them and "
                    "memorize them. I will quiz you about them.\n\n" + _filler(pieces, repeats)
                    + f"\n\nWhat are all the pass keys for {label}? Answer with the numbers "
                    "only, separated by commas.")
            return (_chat(tokenizer, user, ""),)

        (prompt,) = _fit(tokenizer, context_tokens, build)
        samples.append(Sample("multivalue", prompt, keys[0], depth, context_tokens,
                              answers=tuple(keys), max_tokens=40))
    return samples


def kvretrieval(tokenizer, context_tokens: int, depths=DEPTHS, seed: int = 3):
    """A JSON object of random UUID keys and values (no filler); the value of the key at the depth.

    The pair asked for is the ``int(pairs * depth)``-th. Correct: the value in the output.
    """
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        sub = rng.getrandbits(64)

        def build(pairs, sub=sub, depth=depth):
            r = random.Random(sub)
            items = [(str(uuid.UUID(int=r.getrandbits(128), version=4)),
                      str(uuid.UUID(int=r.getrandbits(128), version=4))) for _ in range(pairs)]
            key, value = items[min(pairs - 1, int(pairs * depth))]
            body = ",\n".join(f' "{k}": "{v}"' for k, v in items)
            user = ("Extract the value corresponding to the specified key in the JSON object "
                    "below.\n\nJSON data:\n{\n" + body + "\n}"
                    + f'\n\nWhat is the value of the key "{key}"? Answer with the value only.')
            return _chat(tokenizer, user, ""), value

        prompt, value = _fit(tokenizer, context_tokens, build, low=4, high=16)
        samples.append(Sample("kvretrieval", prompt, value, depth, context_tokens, max_tokens=48))
    return samples


def vartrack(tokenizer, context_tokens: int, depths=DEPTHS, hops: int = 4, seed: int = 4):
    """RULER's variable tracking: ``VAR A = 12345``, then ``hops`` copies ``VAR B = VAR A``...

    The first assignment sits at the depth, the hops evenly spread between it and the
    end of the filler. Names are five random capitals (consonants only, never a word).
    Correct: all ``hops + 1`` names in the output.
    """
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(_CONSONANTS) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}. "] + [
            f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
        pieces = [(depth + (1 - depth) * i / (hops + 1), text) for i, text in enumerate(chain)]

        def build(repeats, pieces=pieces, value=value):
            user = ("Memorize and track the chain of variable assignments hidden in the "
                    "following text.\n\n" + _filler(pieces, repeats)
                    + f"\n\nFind all variables that are assigned the value {value} in the text "
                    "above. Answer with the variable names only, separated by commas.")
            return (_chat(tokenizer, user, ""),)

        (prompt,) = _fit(tokenizer, context_tokens, build)
        samples.append(Sample("vartrack", prompt, names[0], depth, context_tokens,
                              answers=tuple(names), max_tokens=40))
    return samples


def _word_counts(entries: int, common: int) -> tuple[int, int, int]:
    """(common frequency, rare frequency, rare words) for a list of about ``entries`` words.

    RULER's 30 / 3 where the context has room, less for short ones; the rare words
    repeat more once the vocabulary runs out, always at most a third as often.
    """
    frequent = min(30, max(4, entries // 25))
    rare_freq = 2 if frequent < 10 else 3
    rare_freq = max(rare_freq, math.ceil((entries - common * frequent) / (len(_WORDS) - common)))
    frequent = max(frequent, 3 * rare_freq)
    return frequent, rare_freq, max(0, (entries - common * frequent) // rare_freq)


def commonwords(tokenizer, context_tokens: int, depths=DEPTHS, common: int = 10,
                seed: int = 5):
    """RULER's common words extraction: a shuffled numbered list, ``common`` words frequent.

    There is no needle: ``depth`` only labels the sample (each depth draws a fresh
    list). The frequent words appear 30 times each (fewer in short contexts, see
    :func:`_word_counts`), the rest 2-3 times. Scored as RULER does: the share of the
    ten in the output.
    """
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        sub = rng.getrandbits(64)

        def build(entries, sub=sub):
            r = random.Random(sub)
            words = r.sample(_WORDS, len(_WORDS))
            frequent, rare_freq, rare = _word_counts(entries, common)
            top = words[:common]
            listed = top * frequent + words[common:common + rare] * rare_freq
            r.shuffle(listed)
            body = " ".join(f"{i}. {w}" for i, w in enumerate(listed, 1))
            user = ("Below is a numbered list of words. In these words, some appear more often "
                    "than others. Memorize the ones that appear most often.\n\n" + body
                    + f"\n\nWhat are the {common} most common words in the above list? "
                    "Answer with the words only, separated by commas.")
            return _chat(tokenizer, user, ""), tuple(top)

        prompt, top = _fit(tokenizer, context_tokens, build, low=100, high=300)
        samples.append(Sample("commonwords", prompt, top[0], depth, context_tokens, answers=top,
                              max_tokens=64))
    return samples


def qa(tokenizer, context_tokens: int, depths=DEPTHS, seed: int = 6):
    """Question answering over synthetic records: which city one person moved to.

    Every record names a person (first name and surname), a job, a birth year and
    the city they moved to. The person asked about is the only one with that name
    and the only one who moved to that city; their record is the ``int(records * depth)``-th.
    Correct: the city in the output.
    """
    rng = random.Random(seed)
    samples = []
    for depth in depths:
        sub = rng.getrandbits(64)

        def build(records, sub=sub, depth=depth):
            r = random.Random(sub)
            person, city = f"{r.choice(_NAMES)} {r.choice(_SURNAMES)}", r.choice(_TOWNS)
            others = [t for t in _TOWNS if t != city]
            lines = []
            target = min(records - 1, int(records * depth))
            for i in range(records):
                if i == target:
                    name, town = person, city
                else:
                    name = person
                    while name == person:
                        name = f"{r.choice(_NAMES)} {r.choice(_SURNAMES)}"
                    town = r.choice(others)
                born = r.randint(1930, 1980)
                lines.append(f"{name}, a {r.choice(_JOBS)} born in {born}, "
                             f"moved to {town} in {born + r.randint(18, 40)}.")
            user = ("Below are records about people. Read them carefully; I will ask you about "
                    "one of them.\n\n" + "\n".join(lines)
                    + f"\n\nWhich city did {person} move to? Answer with the city name only.")
            return _chat(tokenizer, user, ""), city

        prompt, city = _fit(tokenizer, context_tokens, build)
        samples.append(Sample("qa", prompt, city, depth, context_tokens, max_tokens=16))
    return samples


TASKS = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue,
         "kvretrieval": kvretrieval, "vartrack": vartrack, "commonwords": commonwords, "qa": qa}
DEFAULT_TASKS = ("passkey", "multikey")  # what the published results measured
