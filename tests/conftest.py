"""Test-wide settings: one intra-op thread (tiny models run faster and steadier than with threads
competing for 2 cores) and no tqdm bars cluttering the output."""
import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
