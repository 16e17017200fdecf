"""The check behind every "bad input is one clear line" test of the command-line tools."""


def assert_one_error_line(p, *needles, allow=('loaded ',)):
    """p (a finished subprocess) failed and its stderr is exactly one 'error:' line holding every needle:
    no traceback, no warning, no multi-line message passed through from a library. Lines starting with
    a prefix in allow are the tool's progress lines printed before the error (sample.py's 'loaded ...').
    Returns the error line."""
    assert p.returncode != 0, f"exited 0\n{p.stderr[-3000:]}"
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(tuple(allow))]
    assert len(lines) == 1 and lines[0].startswith('error:'), p.stderr[-3000:]
    for s in needles:
        assert s in lines[0], lines[0]
    return lines[0]
