import os

import torch

# Without a GPU, Triton kernels run in its interpreter; it must be enabled before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
