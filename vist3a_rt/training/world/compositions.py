"""The held-out split of compositions: which attribute bindings and relations training never sees.

Two kinds of composition, each held out by a fixed hash rule (SHA-256 of a salted name, so the
split is the same on every machine and never depends on sampling order):

- an **object type** (colour, shape), e.g. ``("object", "pink", "cone")``: held out with
  probability 1/8 (with ``SALT``: orange cone, purple cone, black cube, pink sphere, brown
  cylinder; every colour keeps 3-4 training shapes, every shape 8-9 training colours);
- a **relation triple** (subject type, relation, object type) between two training types, e.g.
  ``("relation", "red", "cube", "left_of", "blue", "sphere")``: held out with probability 1/16.
  Triples are canonical first: "A right of B" is the same scene as "B left of A", and "A behind B"
  as "B in front of A", so a triple and its mirror are held out together.

A scene *uses* the object types of its objects and the triples its relations state. ``"train"``
scenes use no held-out composition; ``"heldout"`` scenes use at least one (``sampling`` rejects
anything else). Relations the caption does not state are not counted.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from .scene_graph import COLOURS, FLAT_TOPPED, SHAPES, Primitive, Relation

SALT = "vist3a-nano/heldout/v2"  # the first salt whose held-out object types cover all 4 shapes
HELDOUT_OBJECT_RATE = 1 / 8
HELDOUT_RELATION_RATE = 1 / 16
SPLITS = ("train", "heldout")

# relation -> (canonical relation, swap subject and object)
_CANONICAL = {"left_of": ("left_of", False), "right_of": ("left_of", True), "in_front_of": ("in_front_of", False),
              "behind": ("in_front_of", True), "on_top_of": ("on_top_of", False)}


def _unit_hash(*parts: str) -> float:
    digest = hashlib.sha256("|".join((SALT, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@lru_cache(maxsize=None)
def is_heldout_object(colour: str, shape: str) -> bool:
    return _unit_hash("object", colour, shape) < HELDOUT_OBJECT_RATE


def canonical_triple(subject: tuple[str, str], relation: str, obj: tuple[str, str]) -> tuple:
    """``("relation", colour, shape, canonical relation, colour, shape)``."""
    canonical, swap = _CANONICAL[relation]
    first, second = (obj, subject) if swap else (subject, obj)
    return ("relation", *first, canonical, *second)


@lru_cache(maxsize=None)
def _is_heldout_canonical(triple: tuple) -> bool:
    return _unit_hash(*triple) < HELDOUT_RELATION_RATE


def is_heldout_composition(composition: tuple) -> bool:
    if composition[0] == "object":
        return is_heldout_object(*composition[1:])
    return _is_heldout_canonical(composition)


def scene_compositions(objects: tuple[Primitive, ...] | list, relations: tuple[Relation, ...] | list) -> set[tuple]:
    """The compositions a scene uses; ``objects`` may be ``Primitive``s or (colour, shape) pairs."""
    types = [(o.colour, o.shape) if isinstance(o, Primitive) else tuple(o) for o in objects]
    used = {("object", *t) for t in types}
    used |= {canonical_triple(types[r.subject], r.relation, types[r.object]) for r in relations}
    return used


def uses_heldout(objects, relations) -> bool:
    return any(is_heldout_composition(c) for c in scene_compositions(objects, relations))


@lru_cache(maxsize=None)
def heldout_compositions() -> tuple[tuple, ...]:
    """Every held-out object type, then every held-out canonical triple between training types
    with different colours (what a scene can contain); sorted."""
    types = [(c, s) for c in COLOURS for s in SHAPES]
    objects = sorted(("object", *t) for t in types if is_heldout_object(*t))
    train_types = [t for t in types if not is_heldout_object(*t)]
    triples = set()
    for a in train_types:
        for b in train_types:
            if a[0] == b[0]:
                continue
            for relation in ("left_of", "in_front_of", "on_top_of"):
                if relation == "on_top_of" and b[1] not in FLAT_TOPPED:
                    continue
                triple = ("relation", *a, relation, *b)
                if _is_heldout_canonical(triple):
                    triples.add(triple)
    return tuple(objects) + tuple(sorted(triples))
