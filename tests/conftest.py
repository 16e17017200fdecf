import os
import subprocess
import tempfile

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


# ---- background runs: a test's long single-threaded computation, started when collection ends --------------
# The suite keeps about one of CI's 2 cores busy, so a run of minutes started before the first test costs
# little wall time by the time its test reads the result. The test is marked background(argv) and reads
# argv's stdout through the background fixture.

_BACKGROUND = {}      # node id -> (process, its stdout file, its stderr file)


def pytest_configure(config):
    config.addinivalue_line('markers', 'background(argv): the test reads the stdout of argv, a process started '
                                       'before the first test runs (conftest.py: the background fixture)')


def _start(argv):
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')     # a full pipe would stall it
    return subprocess.Popen(argv, stdout=out, stderr=err, text=True), out, err


@pytest.hookimpl(trylast=True)     # after -k / -m have deselected their items
def pytest_collection_modifyitems(config, items):
    """Start the run of every selected test marked background. Not for --collect-only, nor in an xdist
    worker (each would start all of them): there the fixture starts it when its test starts."""
    if config.option.collectonly or hasattr(config, 'workerinput'):
        return
    for item in items:
        m = item.get_closest_marker('background')
        if m:
            _BACKGROUND[item.nodeid] = _start(m.args[0])


@pytest.fixture
def background(request):
    """The stdout of the test's background(argv) run, once it has exited 0."""
    p, out, err = _BACKGROUND.pop(request.node.nodeid, None) or _start(
        request.node.get_closest_marker('background').args[0])
    with out, err:
        p.wait()
        out.seek(0), err.seek(0)
        assert p.returncode == 0, err.read()[-3000:]
        return out.read()


def pytest_unconfigure(config):
    for p, out, err in _BACKGROUND.values():      # their tests did not run (-x, Ctrl-C)
        p.kill()
        p.wait()
        out.close(), err.close()
