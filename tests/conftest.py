import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; it must be enabled before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope='module')
def one_thread():
    """Tiny matmuls: one thread is faster than two spin-waiting ones, and is not disturbed by a second busy
    process on a 2-core machine. Test modules of tiny models use it (pytestmark = usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
