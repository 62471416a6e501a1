"""Signals: SIGTERM (and SIGINT, SIGHUP) stop a rank the way Ctrl-C does, and a rank stops when its
launcher dies.

    install_stop_handlers()   # entry point, main thread: SIGTERM/SIGHUP raise Stopped in the main thread
    watch_parent()            # under a launcher: a daemon thread SIGTERMs this rank if the launcher dies

A stop is an exception in the main thread, so what runs on the way out is the normal error path:
a checkpoint being written is dropped (checkpoint.py writes into a temporary folder and renames it
only when complete, and removes the temporary folder on any exception), the last checkpoint stays
intact, the output-folder lock is released, and several processes leave at once (runtime.fail).
A second signal while stopping exits immediately. `deepspeed` and `torchrun` forward SIGTERM/SIGINT
to every rank; when a launcher is killed outright (SIGKILL) its ranks notice their parent changed.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("apex_fast.runtime")


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so everything that handles Ctrl-C handles it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


_stopping = False


def _handler(signum, frame):
    global _stopping
    if _stopping:  # a second signal while stopping: leave now
        os._exit(128 + signum)
    _stopping = True
    raise Stopped(signum)


def install_stop_handlers(signals=(signal.SIGTERM, signal.SIGHUP)) -> None:
    """SIGTERM/SIGHUP raise Stopped in the main thread (SIGINT already raises KeyboardInterrupt). Call
    from the main thread of the entry point."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (main() called from a worker)
    for s in signals:
        signal.signal(s, _handler)


def watch_parent(interval_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher (LOCAL_RANK set by torchrun/deepspeed): if the parent process dies, send
    SIGTERM to this rank, so no orphan trains on. Returns the daemon thread (None otherwise)."""
    if "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()

    def run():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone: stopping this rank", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    t = threading.Thread(target=run, daemon=True, name="watch-launcher")
    t.start()
    return t
