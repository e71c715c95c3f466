"""Faithfulness on the shapes data: does the picture show what the caption says?

Captions of the shapes dataset (data/SHAPES_SPEC.md) have an exact meaning: a list of objects,
each with a colour, a shape and optionally a size and a position word. `parse_caption` turns a
caption into that list; the attribute reader (dalle2/evaluation/reader.py) turns an image into the list of
objects it shows; `score` compares the two; `aggregate` turns per-image scores into accuracies,
split into seen and zero-shot held-out colour-shape pairs.

Scoring rules (per image):
- colour / shape / size / position: for each attribute separately, how many of the caption's
  stated values are drawn, each on a distinct object: the best one-to-one matching of caption
  objects to detected objects on that attribute alone. These are binding-free: "a red circle and
  a blue square" drawn as a blue circle and a red square scores colour 2/2 and shape 2/2.
  Unstated attributes ("a large circle" has no colour) are not counted.
- binding (captions with >= 2 objects, all stating colour and shape): every colour-shape pair is
  drawn as stated, on distinct objects. The swapped drawing above fails it.
- count: as many objects drawn as the caption names.
- exact: count right AND one assignment of caption objects to drawn objects under which every
  stated attribute of every object is right.

Usage:
    reader = AttributeReader.default(32)
    result = evaluate(reader, images, captions)   # images (N, 3, 32, 32) uint8 or [-1, 1]
    result["summary"]["heldout"]["exact"]
"""
from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Sequence

from dalle2.evaluation.reader import ATTRIBUTES
from data.captions import COLOURS, HOLDOUT_PAIRS, SHAPES, SIZES, article, is_heldout, parse_caption, rephrase
from data.shapes import sample_scene

# ---------------------------------------------------------------------------------------------
# Scoring one image.

def _matches(cap: dict, det: dict, attributes) -> bool:
    return all(cap[a] is None or cap[a] == det[a] for a in attributes)


def _assignable(caption_objects, detected_objects, attributes) -> bool:
    """Whether caption objects can go to distinct detected objects with every stated attribute right."""
    if len(caption_objects) > len(detected_objects):
        return False
    return any(all(_matches(c, detected_objects[j], attributes) for c, j in zip(caption_objects, perm))
               for perm in itertools.permutations(range(len(detected_objects)), len(caption_objects)))


def score(caption_objects: Sequence[dict], detected_objects: Sequence[dict]) -> dict:
    """Compare a parsed caption with the objects read from its image (rules in the module docstring).

    Returns {"n_objects", "n_detected", "colour" / "shape" / "size" / "position": [correct, stated],
    "binding": bool or None (not applicable), "count": bool, "exact": bool}.
    """
    row = {"n_objects": len(caption_objects), "n_detected": len(detected_objects)}
    for a in ATTRIBUTES:
        stated = Counter(o[a] for o in caption_objects if o[a] is not None)
        drawn = Counter(o[a] for o in detected_objects)
        # one-to-one matching on a single attribute = multiset intersection
        row[a] = [sum(min(k, drawn[v]) for v, k in stated.items()), sum(stated.values())]
    binds = len(caption_objects) >= 2 and all(o["colour"] is not None and o["shape"] is not None
                                              for o in caption_objects)
    row["binding"] = _assignable(caption_objects, detected_objects, ("colour", "shape")) if binds else None
    row["count"] = len(detected_objects) == len(caption_objects)
    row["exact"] = row["count"] and _assignable(caption_objects, detected_objects, ATTRIBUTES)
    return row


# ---------------------------------------------------------------------------------------------
# Accuracies over many images.

def _summary(rows: list) -> dict:
    out = {"n": len(rows)}
    for a in ATTRIBUTES:
        stated = sum(r[a][1] for r in rows)
        out[a] = sum(r[a][0] for r in rows) / stated if stated else None
    binding = [r["binding"] for r in rows if r["binding"] is not None]
    out["n_binding"] = len(binding)
    out["binding"] = sum(binding) / len(binding) if binding else None
    for key in ("count", "exact"):
        out[key] = sum(r[key] for r in rows) / len(rows) if rows else None
    return out


def aggregate(rows: Sequence[dict], heldout: Sequence[bool]) -> dict:
    """Accuracies over images: {"all", "seen", "heldout"} -> {"n", "colour", "shape", "size",
    "position" (object-level, over stated values), "binding", "n_binding", "count", "exact"
    (image-level)}; None where nothing was stated / applicable. heldout[i]: see `is_heldout`."""
    if len(rows) != len(heldout):
        raise ValueError(f"{len(rows)} rows but {len(heldout)} held-out flags")
    return {"all": _summary(list(rows)),
            "seen": _summary([r for r, h in zip(rows, heldout) if not h]),
            "heldout": _summary([r for r, h in zip(rows, heldout) if h])}


def evaluate(reader, images, captions: Sequence[str]) -> dict:
    """Read the images and score them against their captions, one caption per image.

    reader: an AttributeReader; images: (N, 3, S, S) uint8 or float in [-1, 1].
    Returns {"rows": per-image score dicts, "heldout": flags, "summary": aggregate(...)}.
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    parsed = [parse_caption(c) for c in captions]
    rows = [score(p, d) for p, d in zip(parsed, reader.read(images))]
    heldout = [is_heldout(p) for p in parsed]
    return {"rows": rows, "heldout": heldout, "summary": aggregate(rows, heldout)}


# ---------------------------------------------------------------------------------------------
# Prompt sets beyond the test captions.

def prompt_sets(seed: int = 0, n: int = 240) -> dict:
    """Deterministic prompt lists for faithfulness beyond the test captions (those are the
    dataset's own test split and not made here). Every prompt parses with `parse_caption`.

    "rephrased": n captions of dataset scenes (1 or 2 objects) in the unseen word order
      "a large rectangle that is gold"; every third scene's first object is a hold-out pair
      (cycling through all six), so with the pairs drawn at random ~40% of prompts are zero-shot.
    "partial": n one-object captions that leave attributes unstated, cycling through four forms:
      "a large circle" (size, shape), "a square" (shape), "a gold shape" (colour), "green" (colour).
    """
    rng = random.Random(f"prompts/{seed}")
    holdout = sorted(HOLDOUT_PAIRS)
    rephrased = []
    for i in range(n):
        first = holdout[(i // 3) % len(holdout)] if i % 3 == 0 else None
        objects = sample_scene(rng, "objects", allow_holdout=True, first=first)["objects"]
        rephrased.append(rephrase(objects, rng))
    partial = []
    for i in range(n):
        size, shape, colour = rng.choice(SIZES), rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        partial.append((f"{article(size)} {size} {shape}", f"{article(shape)} {shape}",
                        f"{article(colour)} {colour} shape", colour)[i % 4])
    return {"rephrased": rephrased, "partial": partial}
