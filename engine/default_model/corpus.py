"""A seeded generator of short, simple stories: the default model's training corpus.

Written for this project, so the corpus is ours to ship and rebuild: the same seed gives
the same text on every machine.
"""

from __future__ import annotations

import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Nora", "Sam", "Ella", "Jack"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "bear", "duck", "frog", "mouse", "owl"]
PLACES = ["park", "forest", "garden", "river", "hill", "beach", "farm", "town", "meadow", "lake"]
THINGS = [
    "ball",
    "kite",
    "red hat",
    "small boat",
    "blue box",
    "big drum",
    "book",
    "shiny stone",
    "toy car",
    "warm coat",
]
FEELINGS = ["happy", "sad", "tired", "brave", "scared", "curious", "proud", "excited"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "quiet"]
ACTIONS = ["play", "run", "sing", "jump", "read", "swim", "dance", "paint"]
TIMES = ["One day", "In the morning", "After lunch", "That evening", "Later", "The next day"]

OPENINGS = [
    "Once upon a time, there was a little {animal} named {name}.",
    "{name} was a {feeling} {animal} who lived near the {place}.",
    "There once lived a {animal} called {name} in a small {place}.",
]
MIDDLES = [
    "{time}, {name} went to the {place} to {action}.",
    "It was a {weather} day, and {name} felt {feeling}.",
    "{name} found a {thing} under a tree.",
    "{name} met a {animal2} who wanted to {action} too.",
    '"Can I {action} with you?" asked the {animal2}.',
    '"Yes, let us {action} together!" said {name}.',
    "The {animal2} had lost a {thing} near the {place}.",
    "{name} looked everywhere for the {thing}.",
    "They walked to the {place2} and looked around.",
    "{name} was {feeling}, but did not give up.",
]
ENDINGS = [
    "In the end, {name} and the {animal2} became good friends.",
    "{name} went home and felt {feeling}.",
    "From that day on, {name} always shared the {thing}.",
    "The sun went down, and {name} slept well that night.",
]


def story(rng: random.Random) -> str:
    slots = {
        "name": rng.choice(NAMES),
        "animal": rng.choice(ANIMALS),
        "animal2": rng.choice(ANIMALS),
        "place": rng.choice(PLACES),
        "place2": rng.choice(PLACES),
        "thing": rng.choice(THINGS),
        "feeling": rng.choice(FEELINGS),
        "weather": rng.choice(WEATHER),
        "action": rng.choice(ACTIONS),
        "time": rng.choice(TIMES),
    }
    sentences = [rng.choice(OPENINGS)]
    sentences += rng.sample(MIDDLES, rng.randint(3, 5))
    sentences.append(rng.choice(ENDINGS))
    return " ".join(s.format(**slots) for s in sentences)


def stories(num_stories: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(num_stories)]
