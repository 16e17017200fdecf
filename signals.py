"""
SIGTERM / SIGINT during training: acknowledged at once, the step finished, a checkpoint written, exit 0;
a second Ctrl-C exits at once without a checkpoint.
"""
import os
import signal
import sys


def watch_signals(master):
    """Python runs signal handlers only between bytecodes: while the main thread is inside one long torch
    op (a CPU backward of a paper-sized model takes minutes) on_signal waits for it. The C-level handler
    also writes each signal's number to a pipe (signal.set_wakeup_fd), which this thread reads at once:
    it says that the first SIGINT/SIGTERM was received, and a second Ctrl-C ends the process there and
    then, without a checkpoint. Returns the function that undoes it (None outside the main thread)."""
    import threading
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:           # not the main thread: on_signal alone
        os.close(r)
        os.close(w)
        return None

    def watch():
        seen = 0
        while data := os.read(r, 64):
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                seen += 1
                if seen == 1 and master:
                    print(f"{signal.Signals(signum).name}: checkpointing at the end of this step, then exiting "
                          f"(Ctrl-C again: exit now, without a checkpoint)", flush=True)
                elif seen > 1 and signum == signal.SIGINT:
                    # a save cut short is only a ckpt_*.tmp, which the next start removes
                    print("interrupted twice: exiting without a checkpoint", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(1)
        os.close(r)
    threading.Thread(target=watch, daemon=True).start()

    def undo():
        if w not in closed:
            signal.set_wakeup_fd(old)
            os.close(w)          # the thread reads the end of the pipe and stops
            closed.append(w)
    closed = []
    return undo



def stop_on_signals(master, on_exit):
    """From now on SIGTERM/SIGINT set stop['signal'] (the loop checkpoints at the end of the step and
    exits 0); returns stop and the function that puts the previous handlers back, also appended to
    on_exit so that it runs however training ends."""
    stop = {'signal': None}
    unwatch = watch_signals(master)          # says so at once, and exits at once on a second Ctrl-C

    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop['signal'] is not None and unwatch is None:
            # a second Ctrl-C means "now": skip the checkpoint. A save cut short is only a ckpt_*.tmp,
            # which the next start removes, so the last complete checkpoint stays the one to resume.
            raise SystemExit("interrupted twice: exiting without a checkpoint")
        stop['signal'] = signum
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for s, h in handlers.items():
            signal.signal(s, h)
        if unwatch:
            unwatch()
    on_exit.append(restore)
    for s in handlers:
        signal.signal(s, on_signal)
    return stop, restore
