"""Open DALL-E 2: a small, readable DALL-E 2 (unCLIP).

Importing the package has no side effects; `DALLE2` is loaded on first use so that importing a
light module (e.g. `dalle2.core.config`) does not pull in the whole model.
"""

__all__ = ["DALLE2"]


def __getattr__(name):
    if name == "DALLE2":
        from dalle2.unclip import DALLE2
        return DALLE2
    raise AttributeError(f"module 'dalle2' has no attribute {name!r}")
