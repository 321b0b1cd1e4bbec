"""A held-out set of the seed's kind ("next number"): digits with separators, English words, Roman
numerals, negatives. Generated from a seed, disjoint from the seed tutorial's 15 examples."""

from __future__ import annotations

import random

SEED_EXAMPLES: list[tuple[str, str]] = [
    ("1", "2"),
    ("3", "4"),
    ("-3", "-2"),
    ("twenty two", "twenty three"),
    ("two hundred", "two hundred one"),
    ("ninety nine", "one hundred"),
    ("8", "9"),
    ("-98", "-97"),
    ("1,000", "1,001"),
    ("10,100,000", "10,100,001"),
    ("thirteen", "fourteen"),
    ("eighty", "eighty one"),
    ("one", "two"),
    ("three", "four"),
    ("seven", "eight"),
]

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split()
)
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """English words as the seed writes them: "two hundred one", "ninety nine"."""
    if n < 0:
        return "minus " + words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for size, name in ((1_000_000, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            return words(head) + " " + name + ("" if rest == 0 else " " + words(rest))
    raise AssertionError(n)


def roman(n: int) -> str:
    out = ""
    for value, sym in (
        (1000, "M"),
        (900, "CM"),
        (500, "D"),
        (400, "CD"),
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ):
        while n >= value:
            out += sym
            n -= value
    return out


def heldout_cases(count: int = 60, seed: int = 1234) -> list[tuple[str, str]]:
    """`count` cases, a third each of digits, words and Roman numerals, none from the seed."""
    rng = random.Random(seed)
    seen = {i for i, _ in SEED_EXAMPLES}
    cases: list[tuple[str, str]] = []
    makers = [
        lambda: (lambda n: (f"{n:,}", f"{n + 1:,}"))(
            rng.choice(
                [rng.randint(-99, 99), rng.randint(100, 99_999), rng.randint(100_000, 9_999_999)]
            )
        ),
        lambda: (lambda n: (words(n), words(n + 1)))(
            rng.choice([rng.randint(0, 99), rng.randint(100, 999), rng.randint(1000, 20_000)])
        ),
        lambda: (lambda n: (roman(n), roman(n + 1)))(rng.randint(1, 300)),
    ]
    while len(cases) < count:
        case = makers[len(cases) % 3]()
        if case[0] not in seen:
            seen.add(case[0])
            cases.append(case)
    return cases
