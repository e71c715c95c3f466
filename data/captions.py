"""The caption grammar of the shapes data (data/SHAPES_SPEC.md: Colours, Shapes, Zero-shot hold-out,
Caption grammar) and its inverse, side by side: `make_caption` writes a scene's caption, `parse_caption`
reads any caption of the grammar (and the evaluation's rephrasings) back into objects.

    make_caption([{"colour": "gold", "shape": "pentagon", "size": "large", ...}], rng, False)
        -> "a large gold pentagon"
    parse_caption("a large gold pentagon")
        -> [{"colour": "gold", "shape": "pentagon", "size": "large", "position": None}]
"""
from __future__ import annotations

import random
from typing import Sequence

# ---------------------------------------------------------------------------------------------
# The vocabulary.

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "silver": (192, 192, 192),
    "maroon": (128, 0, 0),
    "olive": (128, 128, 0),
    "purple": (128, 0, 128),
    "teal": (0, 128, 128),
    "navy": (0, 0, 128),
    "orange": (255, 165, 0),
    "gold": (255, 215, 0),
    "pink": (255, 192, 203),
}
SHAPES: tuple[str, ...] = ("rectangle", "square", "ellipse", "circle", "triangle", "pentagon")
# A tuple in spec order, because iterating a frozenset of strings depends on PYTHONHASHSEED and
# would make the forced test scenes (and so the files) differ between runs.
HOLDOUT_ORDER = (
    ("white", "rectangle"),
    ("gold", "triangle"),
    ("blue", "circle"),
    ("red", "pentagon"),
    ("green", "square"),
    ("yellow", "ellipse"),
)
HOLDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(HOLDOUT_ORDER)

# Caption probabilities (spec: Caption grammar).
P_THE = 0.2
P_DROP_SIZE = 0.3

SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center")
DETERMINERS = ("a", "an", "the")
GENERIC_NOUNS = ("shape", "object")  # "a gold shape": the colour is stated, the shape is not
_POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre"}
_KNOWN = (set(DETERMINERS) | set(SIZES) | set(COLOURS) | set(SHAPES) | set(GENERIC_NOUNS) | _POSITION_WORDS
          | {"and", "at", "that", "is"})
# Every word a prompt of this module may use. A shapes CLIP's tokenizer gets them as words (clip/train.py):
# "that" and "is" never occur in the dataset's captions, and spelled as bytes (5 + 3 tokens) they pushed two-
# object rephrased prompts to 27 tokens, past a context_length of 16; as words the longest prompt is 15.
PROMPT_VOCABULARY = tuple(sorted(_KNOWN))


# ---------------------------------------------------------------------------------------------
# Scene -> caption.

def make_caption(objects: list[dict], rng: random.Random, with_position: bool) -> str:
    """object := [determiner] [size] colour shape [" at the " position]; objects joined by " and ".

    Two draws per object in a fixed order (determiner, then size drop) so captions are reproducible.
    """
    parts = []
    for obj in objects:
        use_the = rng.random() < P_THE
        drop_size = rng.random() < P_DROP_SIZE
        words = ([] if drop_size else [obj["size"]]) + [obj["colour"], obj["shape"]]
        det = "the" if use_the else "an" if words[0][0] in "aeiou" else "a"
        phrase = " ".join([det] + words)
        if with_position:
            phrase += f" at the {obj['position']}"
        parts.append(phrase)
    return " and ".join(parts)


# ---------------------------------------------------------------------------------------------
# Caption -> objects.

def parse_caption(text: str) -> list[dict]:
    """The objects a caption names: [{"colour", "shape", "size", "position"}, ...], None where unstated.

    Grammar (case-insensitive, a final "." allowed), objects joined by "and":
      object := [det] [size] colour (shape | "shape" | "object") [at the position]   "a large gold pentagon"
              | [det] [size] shape ["that is" colour] [at the position]           "a rectangle that is gold"
              | [det] [size] colour [at the position]                             "green" (shape unstated)
              | [det] [size] ("shape" | "object") [at the position]               (nothing but a count)
      det := a | an | the;  position := top left | top right | bottom left | bottom right | top |
      bottom | left | right | center (also spelled centre)
    Raises ValueError naming the first unknown word, or the word where the grammar breaks.
    """
    words = text.strip().rstrip(".").lower().split()
    if not words:
        raise ValueError("empty caption")
    for w in words:
        if w not in _KNOWN:
            raise ValueError(f"unknown word {w!r} in caption {text!r}")
    objects, current = [], []
    for w in words + ["and"]:
        if w != "and":
            current.append(w)
            continue
        if not current:
            raise ValueError(f"an object is missing around 'and' in caption {text!r}")
        objects.append(_parse_object(current, text))
        current = []
    return objects


def _parse_object(words: list, text: str) -> dict:
    obj = {"colour": None, "shape": None, "size": None, "position": None}
    i, n = 0, len(words)

    def at(j):
        return words[j] if j < n else None

    def fail(j, expected):
        found = f"{words[j]!r}" if j < n else "the end"
        raise ValueError(f"expected {expected} but found {found} in caption {text!r}")

    if at(i) in DETERMINERS:
        i += 1
    if at(i) in SIZES:
        obj["size"] = words[i]
        i += 1
    if at(i) in COLOURS:
        obj["colour"] = words[i]
        i += 1
        if at(i) in SHAPES or at(i) in GENERIC_NOUNS:
            obj["shape"] = words[i] if words[i] in SHAPES else None
            i += 1
    elif at(i) in SHAPES or at(i) in GENERIC_NOUNS:
        obj["shape"] = words[i] if words[i] in SHAPES else None
        i += 1
        if at(i) == "that":
            if at(i + 1) != "is":
                fail(i + 1, "'is'")
            if at(i + 2) not in COLOURS:
                fail(i + 2, "a colour")
            obj["colour"] = words[i + 2]
            i += 3
    else:
        fail(i, "a colour or a shape")
    if at(i) == "at":
        if at(i + 1) != "the":
            fail(i + 1, "'the'")
        i += 2
        two = " ".join(words[i:i + 2])
        if i + 1 < n and two in POSITIONS:
            obj["position"] = two
            i += 2
        elif at(i) in _POSITION_WORDS:
            obj["position"] = "center" if words[i] == "centre" else words[i]
            i += 1
        else:
            fail(i, "a position")
    if i != n:
        fail(i, "'and' or the end")
    return obj


def is_heldout(caption_objects: Sequence[dict]) -> bool:
    """Whether a caption names a zero-shot hold-out colour-shape pair (never seen in training)."""
    return any((o["colour"], o["shape"]) in HOLDOUT_PAIRS for o in caption_objects)


# ---------------------------------------------------------------------------------------------
# Another word order (the evaluation's "rephrased" prompts; parse_caption reads them too).

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def rephrase(objects: Sequence[dict], rng: random.Random) -> str:
    """Objects (metadata dicts) as "a <size> <shape> that is <colour>" phrases joined by "and";
    the size word dropped with the dataset's probability."""
    parts = []
    for o in objects:
        words = ([] if rng.random() < P_DROP_SIZE else [o["size"]]) + [o["shape"]]
        parts.append(f"{article(words[0])} {' '.join(words)} that is {o['colour']}")
    return " and ".join(parts)
