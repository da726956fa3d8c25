"""The built-in ``synthetic`` data set: customer-support messages from a few users.

Why it exists: the default demo must run offline, in minutes, with a *natural*
federated split. Each message is an intent (billing, travel, ...) written by one
user, and every user has their own phrasing habits (greeting, opener, filler words,
sign-off, typos, casing, punctuation, favourite sentence templates, and which intents
they ask about), so ``partition=natural partition.by=user`` is a realistic non-IID
split in both features and labels.

Why it is not trivially separable: the intents share vocabulary (cards, payments,
bookings and the app appear in several of them), a fraction of the messages are
genuinely ambiguous between two intents (their label is a coin flip between the
two), every message can carry a class-independent context phrase full of such
shared words, and a fraction of the labels are flipped at random (label noise).

Everything is drawn from ``random.Random`` instances seeded from the config seed,
never from global state, so a (config, seed) pair always gives the same data.
Changing ``test_size`` does not change the training split (train comes first in the
stream), and changing ``label_noise`` does not change any text (labels are flipped
from a separate stream).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

# Intent name -> (sentence templates, {slot: fillers}). A template's {slot} is filled
# from the intent's own slot lists or, failing that, from SHARED_SLOTS.
INTENTS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "billing": (
        [
            "why was I charged twice for {obj}",
            "I see a payment of {amount} for {obj} that I did not make",
            "can I get a refund for {obj}",
            "the bill for {obj} is higher than {expected}",
            "there is a fee on my statement for {obj}",
        ],
        {"obj": ["my order", "the subscription", "my booking", "the hotel", "my card", "last month", "the upgrade"]},
    ),
    "travel": (
        [
            "I need to change {obj} to {day}",
            "can I move {obj} to {day} instead",
            "{obj} was cancelled and I need a new one",
            "is there a seat left on {obj} for {day}",
            "I want to add a bag to {obj}",
        ],
        {"obj": ["my flight", "my booking", "the hotel", "my trip", "the train ticket", "the reservation"]},
    ),
    "tech_support": (
        [
            "the app crashes every time I {action}",
            "I get an error when I try to {action}",
            "the page keeps loading when I {action}",
            "the website logs me out when I {action}",
            "nothing happens when I tap the button to {action}",
        ],
        {
            "action": [
                "pay",
                "book a flight",
                "track my order",
                "open my account",
                "check my card",
                "change my booking",
                "log in",
            ]
        },
    ),
    "delivery": (
        [
            "{obj} has not arrived since {day}",
            "where is {obj}, it said it would come {day}",
            "the tracking for {obj} has not moved since {day}",
            "{obj} was delivered to the wrong address",
            "{obj} arrived damaged and half empty",
        ],
        {"obj": ["my order", "the package", "my new card", "the parcel", "the replacement", "my refund cheque"]},
    ),
    "account": (
        [
            "how do I change {field} on my account",
            "I forgot {field} and cannot get in",
            "please update {field} before {day}",
            "I want to close my account and remove {field}",
            "someone changed {field} without asking me",
        ],
        {"field": ["my password", "my email", "my address", "my phone number", "my name", "the login details"]},
    ),
    "cards": (
        [
            "my card was {event} {day}",
            "I think my card was {event} and I need a new one",
            "can you block my card, it was {event}",
            "my card got {event} at the machine",
            "the pin for my card does not work since {day}",
        ],
        {"event": ["lost", "stolen", "declined", "swallowed", "frozen", "copied"]},
    ),
}

SHARED_SLOTS: dict[str, list[str]] = {
    "day": ["yesterday", "today", "last week", "on monday", "on friday", "two days ago", "next week", "tomorrow"],
    "amount": ["20 euros", "45 dollars", "100 pounds", "a small amount", "9.99"],
    "expected": ["usual", "what I was told", "the price online"],
}

# Messages that honestly belong to two intents; the label is either, at random.
AMBIGUOUS: dict[tuple[str, str], list[str]] = {
    ("billing", "travel"): [
        "I paid for my flight but it was cancelled",
        "the hotel charged me for a night I cancelled",
    ],
    ("billing", "cards"): [
        "my card was charged twice and then declined",
        "there is a payment on my card I do not know",
    ],
    ("account", "tech_support"): [
        "I cannot log in, it says my password is wrong",
        "the app forgot my email and my login",
    ],
    ("cards", "delivery"): [
        "my new card has not arrived and I need to pay today",
        "the replacement card never came and the old one is frozen",
    ],
    ("billing", "delivery"): [
        "I paid for shipping but the package never came",
        "I want my money back for the parcel that is missing",
    ],
    ("tech_support", "travel"): ["the app would not let me change my flight", "booking the hotel failed with an error"],
    ("account", "cards"): [
        "I changed my address and now my card does not work",
        "my card is blocked since I updated my phone number",
    ],
}

# Class-independent context, deliberately full of words that also mark intents.
CONTEXTS = [
    "since {day}",
    "and I am a bit worried",
    "this is the second time",
    "for my family",
    "because I travel a lot",
    "and the app did not help",
    "after I paid",
    "with my card",
    "on my account",
    "for the order from {day}",
]

# Per-user habits are dealt from these pools (rotated, so that up to a pool's size
# users never share the same item) and combined, so users are told apart by them.
GREETINGS = [
    "hi",
    "hello",
    "hey there",
    "good morning",
    "dear support",
    "hiya",
    "yo",
    "greetings",
    "hello team",
    "hi folks",
    "morning",
    "hey",
]
OPENERS = [
    "i was wondering",
    "quick question",
    "not sure this is the right place but",
    "sorry to bother you but",
    "so",
    "i hope you can help",
    "just to let you know",
    "one more thing",
    "help",
    "ok so",
]
FILLERS = [
    "honestly",
    "basically",
    "like",
    "um",
    "actually",
    "literally",
    "tbh",
    "really",
    "well",
    "seriously",
    "anyway",
    "kinda",
]
SIGNOFFS = [
    "thanks",
    "thank you",
    "cheers",
    "thx",
    "regards",
    "ty",
    "much appreciated",
    "bye",
    "please help",
    "asap",
    "many thanks",
    "ta",
]
ENDINGS = ["?", "!", ".", "!!", "", "..."]

# How unevenly a user spreads their messages over intents (gamma shape of their
# class weights; lower = more skewed) and how unevenly users differ in activity.
USER_CLASS_SHAPE = 2.0
USER_ACTIVITY_SHAPE = 8.0


@dataclass(frozen=True)
class _User:
    """One user's writing habits; drawn once per user from the text stream."""

    name: str
    greeting: str
    greeting_p: float
    opener: str
    opener_p: float
    fillers: tuple[str, str]
    filler_p: float
    signoff: str
    ending: str
    lowercase: bool
    typo_rate: float
    class_weights: tuple[float, ...]
    template_weights: dict[str, tuple[float, ...]]


def intent_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` intents (the generator's label set)."""
    if not 2 <= num_classes <= len(INTENTS):
        raise ValueError(f"num_classes must be in [2, {len(INTENTS)}], got {num_classes}")
    return list(INTENTS)[:num_classes]


def generate(
    *,
    num_classes: int,
    num_users: int,
    train_size: int,
    test_size: int,
    label_noise: float,
    ambiguous_fraction: float,
    seed: int,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) with columns ``text``, ``label`` (intent name) and ``user``.

    Both splits come from the same users and the same distribution; the test split
    is simply the continuation of the stream after the training examples.
    """
    if num_users < 1 or train_size < 1 or test_size < 1:
        raise ValueError("num_users, train_size and test_size must be positive")
    if not 0.0 <= label_noise < 1.0 or not 0.0 <= ambiguous_fraction <= 1.0:
        raise ValueError("label_noise must be in [0, 1) and ambiguous_fraction in [0, 1]")
    intents = intent_names(num_classes)
    text_rng = random.Random(f"fedpriv-synthetic:{seed}:text")
    noise_rng = random.Random(f"fedpriv-synthetic:{seed}:noise")
    users = [_draw_user(text_rng, i, num_users, intents) for i in range(num_users)]
    activity = [text_rng.gammavariate(USER_ACTIVITY_SHAPE, 1.0) for _ in users]
    ambiguous = {pair: texts for pair, texts in AMBIGUOUS.items() if pair[0] in intents and pair[1] in intents}

    rows: dict[str, list[str]] = {"text": [], "label": [], "user": []}
    for i in range(train_size + test_size):
        # Every user writes at least one training message, so natural partitions are
        # never empty; afterwards users write in proportion to their activity.
        user = users[i] if i < min(num_users, train_size) else text_rng.choices(users, weights=activity)[0]
        text, label = _message(text_rng, user, intents, ambiguous, ambiguous_fraction)
        if noise_rng.random() < label_noise:
            label = noise_rng.choice([c for c in intents if c != label])
        rows["text"].append(text)
        rows["label"].append(label)
        rows["user"].append(user.name)
    import datasets

    full = datasets.Dataset.from_dict(rows)
    return full.select(range(train_size)), full.select(range(train_size, len(full)))


def _draw_user(rng: random.Random, index: int, num_users: int, intents: list[str]) -> _User:
    def dealt(pool: list[str], offset: int) -> str:
        # Rotation with a per-pool offset: distinct items for the first len(pool) users.
        return pool[(index + offset) % len(pool)]

    width = len(str(num_users - 1))
    return _User(
        name=f"user_{index:0{width}d}",  # zero-padded: sorted order = index order
        greeting=dealt(GREETINGS, 0),
        greeting_p=rng.uniform(0.5, 0.95),
        opener=dealt(OPENERS, 3),
        opener_p=rng.uniform(0.2, 0.6),
        fillers=(dealt(FILLERS, 0), dealt(FILLERS, 5)),
        filler_p=rng.uniform(0.3, 0.8),
        signoff=dealt(SIGNOFFS, 7),
        ending=rng.choice(ENDINGS),
        lowercase=rng.random() < 0.5,
        typo_rate=rng.uniform(0.0, 0.08),
        class_weights=tuple(rng.gammavariate(USER_CLASS_SHAPE, 1.0) for _ in intents),
        template_weights={c: tuple(rng.gammavariate(1.0, 1.0) for _ in INTENTS[c][0]) for c in intents},
    )


def _message(
    rng: random.Random,
    user: _User,
    intents: list[str],
    ambiguous: dict[tuple[str, str], list[str]],
    ambiguous_fraction: float,
) -> tuple[str, str]:
    label = rng.choices(intents, weights=user.class_weights)[0]
    pairs = [pair for pair in ambiguous if label in pair]
    if pairs and rng.random() < ambiguous_fraction:
        pair = rng.choice(pairs)
        core = rng.choice(ambiguous[pair])
        label = rng.choice(pair)
    else:
        templates, slots = INTENTS[label]
        template = rng.choices(templates, weights=user.template_weights[label])[0]
        core = _fill(rng, template, slots)
    words = core.split()
    if rng.random() < 0.6:
        words += _fill(rng, rng.choice(CONTEXTS), {}).split()
    for _ in range(2):
        if rng.random() < user.filler_p:
            words.insert(rng.randrange(len(words) + 1), rng.choice(user.fillers))
    if rng.random() < user.opener_p:
        words = user.opener.split() + words
    words = [_typo(rng, w) if rng.random() < user.typo_rate else w for w in words]
    body = " ".join(words) + user.ending
    if rng.random() < user.greeting_p:
        body = f"{user.greeting}, {body}"
    body = f"{body} {user.signoff}"
    return (body.lower() if user.lowercase else body[0].upper() + body[1:]), label


def _fill(rng: random.Random, template: str, slots: dict[str, list[str]]) -> str:
    values = {
        name: rng.choice(slots.get(name) or SHARED_SLOTS[name])
        for name in {**SHARED_SLOTS, **slots}
        if "{" + name + "}" in template
    }
    return template.format(**values)


def _typo(rng: random.Random, word: str) -> str:
    """Swap, drop or double one inner letter: the kinds of slips people make."""
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]
