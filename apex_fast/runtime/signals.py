"""Signals: SIGTERM (and SIGINT, SIGHUP) stop a rank the way Ctrl-C does, and a rank stops when its
launcher dies.

    install_stop_handlers()   # entry point, main thread: SIGTERM/SIGHUP raise Stopped in the main thread
    watch_parent()            # under a launcher: a daemon thread SIGTERMs this rank if its launcher (or the
                              # `deepspeed` runner above deepspeed.launcher.launch) dies

A stop is an exception in the main thread, so what runs on the way out is the normal error path:
a checkpoint being written is dropped (checkpoint.py writes into a temporary folder and renames it
only when complete, and removes the temporary folder on any exception), the last checkpoint stays
intact, the output-folder lock is released, and several processes leave at once (runtime.fail).
A second signal while stopping exits immediately. torchrun and deepspeed.launcher.launch forward
SIGTERM/SIGINT to every rank; the outer `deepspeed` runner forwards nothing (a signal kills it
alone), and a launcher killed outright (SIGKILL) forwards nothing either: the ranks watch their
launchers and stop when one is gone.
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
    from the main thread of the entry point. A signal the process was started ignoring stays ignored:
    `nohup` ignores SIGHUP so that a run outlives the terminal (as Python itself keeps an ignored SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (main() called from a worker)
    for s in signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _handler)


# programs that start ranks (directly or through another launcher): the `deepspeed` runner starts
# `deepspeed.launcher.launch`, which starts the ranks; torchrun starts them itself
LAUNCHERS = frozenset({"deepspeed", "ds", "deepspeed.launcher.runner", "deepspeed.launcher.launch", "torchrun",
                       "torch.distributed.run", "torch.distributed.launch"})


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process from /proc (None if gone or no /proc). The start
    time tells a process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has exited; only its parent has not collected it yet
        return None
    return int(fields[1]), int(fields[19])


def program(argv: list[str]) -> str:
    """What a command line runs: the module of ``python -m mod``, the script of ``python path``, or
    the executable's name."""
    if not argv:
        return ""
    if not os.path.basename(argv[0]).startswith("python"):
        return os.path.basename(argv[0])
    rest = iter(argv[1:])
    for a in rest:
        if a == "-m":
            return next(rest, "")
        if a in ("-c", "-"):
            return ""
        if not a.startswith("-"):
            return os.path.basename(a)
    return ""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def launcher_chain(pid: int | None = None) -> list[tuple[int, int | None, str]]:
    """The launchers this process runs under, nearest first, as (pid, start time, program): the
    parent always (whatever started a rank), then each further ancestor while it is a launcher
    (LAUNCHERS), e.g. deepspeed.launcher.launch then the `deepspeed` runner. Without /proc: the
    parent only. A shell or job script above the launchers is not watched (a `nohup` run outlives it)."""
    pid = os.getpid() if pid is None else pid
    parent = os.getppid() if pid == os.getpid() else (_stat(pid) or (0, 0))[0]
    st = _stat(parent)
    chain = [(parent, None if st is None else st[1], program(_cmdline(parent)))]
    while st is not None and chain[-1][2] in LAUNCHERS:
        up = _stat(st[0])
        if up is None or st[0] <= 1:
            break
        name = program(_cmdline(st[0]))
        if name not in LAUNCHERS:
            break
        chain.append((st[0], up[1], name))
        st = up
    return chain


def watch_parent(interval_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher (LOCAL_RANK set by torchrun/deepspeed): if the parent process or a launcher
    above it dies, send SIGTERM to this rank, so no orphan trains on. The ancestors watched are the
    parent and every launcher directly above it (launcher_chain): a SIGTERM or SIGINT to the outer
    `deepspeed` runner kills only the runner (it forwards nothing to deepspeed.launcher.launch, which
    would keep its ranks training), so the ranks notice it themselves and stop; their launcher then
    exits on their non-zero exit. Returns the daemon thread (None when not under a launcher)."""
    if "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()
    chain = launcher_chain()

    def gone() -> tuple[int, str] | None:
        if os.getppid() != parent:
            return parent, chain[0][2] or "the launcher"
        for pid, start, name in chain:
            st = _stat(pid)
            if start is not None and (st is None or st[1] != start):
                return pid, name
        return None

    def run():
        while True:
            time.sleep(interval_s)
            dead = gone()
            if dead is not None:
                log.error("the launcher %s (pid %d) is gone: stopping this rank", dead[1], dead[0])
                os.kill(os.getpid(), signal.SIGTERM)
                return

    t = threading.Thread(target=run, daemon=True, name="watch-launcher")
    t.start()
    return t
