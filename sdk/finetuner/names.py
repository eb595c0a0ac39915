"""Random memorable run names, like ``vigilant-tereshkova``: an adjective and a scientist."""

from __future__ import annotations

import random

ADJECTIVES: tuple[str, ...] = (
    'admiring', 'agitated', 'amazing', 'blissful', 'bold', 'brave', 'busy', 'charming', 'clever',
    'compassionate', 'competent', 'confident', 'cool', 'dazzling', 'determined', 'eager', 'ecstatic',
    'elastic', 'elegant', 'epic', 'exciting', 'fervent', 'festive', 'focused', 'friendly', 'frosty',
    'funny', 'gallant', 'gifted', 'goofy', 'gracious', 'happy', 'hopeful', 'hungry', 'infallible',
    'inspiring', 'intelligent', 'jolly', 'jovial', 'keen', 'kind', 'laughing', 'loving', 'lucid',
    'magical', 'modest', 'musing', 'mystifying', 'nervous', 'nice', 'nifty', 'nostalgic', 'objective',
    'optimistic', 'peaceful', 'pensive', 'practical', 'priceless', 'quirky', 'quizzical', 'relaxed',
    'reverent', 'romantic', 'serene', 'sharp', 'silly', 'sleepy', 'stoic', 'strange', 'sweet',
    'tender', 'thirsty', 'trusting', 'upbeat', 'vibrant', 'vigilant', 'vigorous', 'wizardly',
    'wonderful', 'xenodochial', 'youthful', 'zealous', 'zen',
)  # fmt: skip

SCIENTISTS: tuple[str, ...] = (
    'agnesi', 'albattani', 'archimedes', 'babbage', 'bardeen', 'bartik', 'bell', 'bhabha', 'blackwell',
    'bohr', 'booth', 'bose', 'brahmagupta', 'brattain', 'cannon', 'carson', 'cerf', 'chandrasekhar',
    'clarke', 'curie', 'darwin', 'dijkstra', 'einstein', 'elion', 'euclid', 'euler', 'faraday',
    'fermat', 'fermi', 'feynman', 'franklin', 'galileo', 'gauss', 'goldberg', 'goodall', 'hamilton',
    'hawking', 'heisenberg', 'hermann', 'hertz', 'hodgkin', 'hopper', 'hypatia', 'jackson', 'jang',
    'johnson', 'kalam', 'kepler', 'khorana', 'knuth', 'kowalevski', 'lamarr', 'leakey', 'lovelace',
    'lumiere', 'mayer', 'mccarthy', 'meitner', 'mendel', 'mirzakhani', 'morse', 'napier', 'newton',
    'noether', 'pascal', 'pasteur', 'payne', 'perlman', 'poincare', 'ramanujan', 'ritchie', 'rosalind',
    'shannon', 'shockley', 'sinoussi', 'swartz', 'tereshkova', 'tesla', 'thompson', 'torvalds', 'turing',
    'varahamihira', 'villani', 'volta', 'wilbur', 'williams', 'wing', 'wozniak', 'wright', 'yalow', 'yonath',
)  # fmt: skip


def random_name(rng: random.Random | None = None) -> str:
    """``<adjective>-<scientist>``: a valid DNS-1123 label, easy to say and to type."""
    chooser = rng or random.SystemRandom()
    return f'{chooser.choice(ADJECTIVES)}-{chooser.choice(SCIENTISTS)}'


def unique_name(taken: set[str], rng: random.Random | None = None) -> str:
    """A random name not in ``taken``; a short suffix is added once the plain names run out."""
    chooser = rng or random.SystemRandom()
    for _ in range(50):
        name = random_name(chooser)
        if name not in taken:
            return name
    while True:
        name = f'{random_name(chooser)}-{chooser.randrange(16**4):04x}'
        if name not in taken:
            return name
