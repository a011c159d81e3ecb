"""Captions from a scene graph: templates, synonyms and mirrored phrasings over a fixed vocabulary.

Every object is named with its colour and a shape word (``SHAPE_WORDS``), with a size word in
60% of mentions. Colours are distinct within a scene, so a second mention ("the blue ball") is
unambiguous. A relation "A left of B" may be said as it is or mirrored ("B to the right of A",
"B under A" for "A on top of B"), and in a relation-first order ("to the left of a blue sphere
there is a red cube"). Lower case, words separated by single spaces, no punctuation: every
caption is a sequence of ``VOCABULARY`` words (the nano tokenizer is trained on that list).
"""

from __future__ import annotations

import numpy as np

from .scene_graph import COLOURS, Primitive, Relation, SceneGraph

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"cube": ("cube", "box", "block"), "sphere": ("sphere", "ball"),
               "cylinder": ("cylinder",), "cone": ("cone",)}
RELATION_WORDS = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "in_front_of": ("in front of",),
    "behind": ("behind", "in back of"),
    "on_top_of": ("on top of", "on", "resting on", "stacked on"),
    "under": ("under", "below", "beneath", "underneath"),
}
MIRROR = {"left_of": "right_of", "right_of": "left_of", "in_front_of": "behind", "behind": "in_front_of",
          "on_top_of": "under"}
ONE_OBJECT = ("{a}", "there is {a}", "{a} on the ground", "a scene with {a}")
TWO_OBJECTS = ("{a} {r} {b}", "{a} is {r} {b}", "there is {a} {r} {b}", "a scene with {a} {r} {b}",
               "{r} {b} there is {a}")
SECOND_CLAUSE = ("{a} {r} {b}", "{a} is {r} {b}")  # joined to the first with "and"
SIZE_MENTION_PROBABILITY = 0.6


def _template_words() -> set[str]:
    templates = ONE_OBJECT + TWO_OBJECTS + SECOND_CLAUSE
    words = {w for t in templates for w in t.split() if not w.startswith("{")}
    return words | {"a", "an", "the", "and"}


VOCABULARY: tuple[str, ...] = tuple(sorted(
    _template_words() | set(COLOURS)
    | {w for table in (SIZE_WORDS, SHAPE_WORDS, RELATION_WORDS) for words in table.values()
       for phrase in words for w in phrase.split()}))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def noun_phrase(obj: Primitive, rng: np.random.Generator, definite: bool = False) -> str:
    """"a small red cube", "an orange ball", "the blue block", ..."""
    words = [obj.colour, _pick(rng, SHAPE_WORDS[obj.shape])]
    if rng.random() < SIZE_MENTION_PROBABILITY:
        words.insert(0, _pick(rng, SIZE_WORDS[obj.size]))
    article = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article, *words])


def _clause_parts(objects, relation: Relation, rng, mentioned: set[int]) -> tuple[str, str, str]:
    """(first noun phrase, relation phrase, second noun phrase), possibly mirrored."""
    first, rel, second = relation.subject, relation.relation, relation.object
    if rng.random() < 0.5:
        first, rel, second = second, MIRROR[rel], first
    a = noun_phrase(objects[first], rng, definite=first in mentioned)
    b = noun_phrase(objects[second], rng, definite=second in mentioned)
    mentioned.update((first, second))
    return a, _pick(rng, RELATION_WORDS[rel]), b


def make_caption(scene: SceneGraph, rng: np.random.Generator) -> str:
    """One caption of ``scene`` (1 object, or one clause per relation joined by "and")."""
    objects, relations = scene.objects, scene.relations
    if not relations:
        return _pick(rng, ONE_OBJECT).format(a=noun_phrase(objects[0], rng))
    mentioned: set[int] = set()
    a, r, b = _clause_parts(objects, relations[0], rng, mentioned)
    clauses = [_pick(rng, TWO_OBJECTS).format(a=a, r=r, b=b)]
    for relation in relations[1:]:
        a, r, b = _clause_parts(objects, relation, rng, mentioned)
        clauses.append(_pick(rng, SECOND_CLAUSE).format(a=a, r=r, b=b))
    return " and ".join(clauses)
