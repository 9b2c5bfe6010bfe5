import os
import sys

import torch

# The benchmarks time real kernels: on a CPU machine they run the reference/CPU paths at small
# sizes (the interpreter is a correctness tool, not something to time).
if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(__file__))
