"""Suite-wide settings: CPU only, Triton kernels through the interpreter, at most two threads."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any `import triton`

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))  # CI has 2 cores; subprocess tests set their own
