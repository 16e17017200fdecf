"""Independent subprocess runs of one test (or fixture) at the same time."""
from concurrent.futures import ThreadPoolExecutor


def together(*calls):
    """Call each of calls (functions of no argument, each waiting on its own subprocess) on its own thread
    and return their results in order; an exception (pytest.fail too) is raised as the call raised it.
    A test waiting on one subprocess leaves the other core of a 2-core machine idle: two independent runs
    at once take little more than the longer one."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]
