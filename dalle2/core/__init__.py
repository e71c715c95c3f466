"""The foundation every stage stands on: config, checkpoint format, layers, tokenizer, runtime
(device, DDP, autocast), the trainer, file and image I/O, plots, CLI plumbing and the error base class.

Nothing here imports anything else from the repo (tests/test_layering.py enforces it).
"""
