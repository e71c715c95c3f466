"""The one base class of the project's errors.

Every error that means bad input (a file, a config key, a value) derives from `Dalle2Error`; the entry
points (dalle2/core/cli.py `main_wrapper`) print it as one line, `error: <message>`, with no traceback.
"""


class Dalle2Error(Exception):
    """Bad input, named in the message: the file, the key or the value, and what to do about it."""
