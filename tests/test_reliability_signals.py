"""Signals on real tiny runs: SIGTERM stops promptly and leaves every checkpoint intact, a rank
whose launcher dies stops, a rank stops when a launcher above its parent dies (the outer
`deepspeed` runner) but not when a shell or job script above the launchers does,
SIGTERM/SIGINT to torchrun and to the outer `deepspeed` runner stop every rank and the launcher in
between (2 processes, slow)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from apex_fast.checkpoint import checkpoint_dirs, load_checkpoint
from apex_fast.run_folder import RunFolder

from _fast import quick_run

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "apex_fast" / "train.py")
FAST = quick_run(
    "sample.num_steps=3", "train.micro_batch_size=2", "checkpoint.keep=100", "log.plot=false",
    "train.epochs=100000", 'rewards=[{"name":"jpeg_compressibility","weight":1}]',
)


def args(out):
    a = ["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(out)]
    for o in FAST:
        a += ["--set", o]
    return a


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def wait_for_checkpoint(out, proc, n=2, timeout=300):
    deadline = time.monotonic() + timeout
    while len(checkpoint_dirs(out / "checkpoints")) < n:
        assert proc.poll() is None, f"trainer exited early (rc {proc.returncode})"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def assert_intact(out):
    found = checkpoint_dirs(out / "checkpoints")
    assert found
    for ck in found:
        load_checkpoint(ck)  # verifies every file's checksum
    # (a rank still writing its engine shards when stopped may leave .engine-*: tidied on the next start)
    left = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not left, f"a half-written checkpoint was left behind: {left}"
    lock = RunFolder(out)
    lock.acquire()  # nobody holds the folder any more
    lock.release()


def test_sigterm_stops_promptly_and_leaves_checkpoints_intact(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(out, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 143 and "stopped by SIGTERM" in output and "--resume latest" in output
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_intact(out)


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_a_rank_stops_when_its_launcher_dies(tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, TRAIN, *args(out)], stdout=subprocess.PIPE, text=True,
                                env=env(LOCAL_RANK="0"))
    child = int(launcher.stdout.readline())
    try:
        wait_for_checkpoint(out, launcher, n=1)
        launcher.kill()  # SIGKILL: the launcher cannot forward anything
        launcher.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the rank kept training after its launcher died")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert_intact(out)


def test_nohup_runs_outlive_the_terminal():
    """`nohup` starts the run with SIGHUP ignored; the stop handlers keep it ignored (a closed terminal
    must not stop a nohup run), while SIGTERM still stops it."""
    code = textwrap.dedent("""
        import signal, sys, time
        from apex_fast import runtime as rt
        rt.install_stop_handlers()
        print("ready", flush=True)
        try:
            time.sleep(60)
        except rt.Stopped as e:
            print(e, flush=True)
            raise SystemExit(128 + e.signum)
    """)
    proc = subprocess.Popen(["nohup", sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGHUP stopped a nohup run"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143 and "stopped by SIGTERM" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


FAKE_LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable] + sys.argv[1:])  # forwards no signal, like the deepspeed runner
    time.sleep(600)
""")
RANK = textwrap.dedent("""
    import os, sys, time
    from apex_fast import runtime as rt
    rt.install_stop_handlers()
    rt.watch_parent(interval_s=0.1)
    open(sys.argv[1], "w").write(str(os.getpid()))
    try:
        time.sleep(600)
    except rt.Stopped as e:
        open(sys.argv[1] + ".stopped", "w").write(str(e))
        raise SystemExit(128 + e.signum)
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.is_file() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="ancestors are read from /proc")
@pytest.mark.parametrize("outer, stops", [("deepspeed", True), ("job.sh", False)], ids=["launcher", "job_script"])
def test_a_rank_stops_when_a_launcher_above_its_parent_dies(tmp_path, outer, stops):
    """outer -> torchrun-named launcher -> rank: the outer one killed alone (SIGTERM, forwarded to
    nobody) stops the rank when it is a launcher (the `deepspeed` runner above
    deepspeed.launcher.launch); a job script above the launchers may end while the run goes on."""
    for name in (outer, "torchrun"):
        (tmp_path / name).write_text(FAKE_LAUNCHER)
    pidfile = tmp_path / "rank.pid"
    outer_proc = subprocess.Popen([sys.executable, str(tmp_path / outer), str(tmp_path / "torchrun"), "-c", RANK,
                                   str(pidfile)], env=env(LOCAL_RANK="0"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.is_file() or not pidfile.read_text():
            assert time.monotonic() < deadline and outer_proc.poll() is None, "the rank did not start"
            time.sleep(0.05)
        rank = int(pidfile.read_text())
        outer_proc.terminate()
        outer_proc.wait(timeout=10)
        deadline = time.monotonic() + (10 if stops else 2)
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        if stops:
            assert not _alive(rank), "the rank kept running after the deepspeed runner above its launcher died"
            assert (tmp_path / "rank.pid.stopped").read_text() == "stopped by SIGTERM"
        else:
            assert _alive(rank), "the rank stopped when a job script above its launcher ended"
    finally:
        os.killpg(outer_proc.pid, signal.SIGKILL)


def descendants(pid):
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so a session
    or process group would miss them)."""
    found, todo = [], [pid]
    while todo:
        kids = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        found += [int(k) for k in kids]
        todo += kids
    return found


def launcher_test(cmd, out, sig, timeout=400):
    """Start a 2-process run under a launcher (output to a file: orphans may hold a pipe open), wait
    for its second checkpoint, send ``sig`` to the launcher process alone, and check that every
    process below it (launcher stages and ranks) exits within a bound and the checkpoints are intact.
    Bounded everywhere; every process of the run is killed in any case. Returns the run's output."""
    log = out.parent / "launcher.log"
    below = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_checkpoint(out, proc, timeout=timeout)
        below = descendants(proc.pid)
        ranks = [p for p in below if b"apex_fast/train.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(ranks) >= 2, f"expected 2 ranks below the launcher, found {below}"
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        while time.monotonic() - t0 < 60 and any(_alive(p) for p in below):
            time.sleep(0.2)
        left = [subprocess.run(["ps", "-o", "pid=,args=", "-p", str(p)], capture_output=True,
                               text=True).stdout.strip()[:160] for p in below if _alive(p)]
        assert not left, f"still running 60 s after the signal: {left}\n{log.read_text()[-3000:]}"
    finally:
        for p in [proc.pid, *below]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
    assert_intact(out)
    return log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_deepspeed_runner_alone_stops_every_rank(tmp_path, sig):
    """`deepspeed --num_gpus 2 train.py ...` (the runner -> deepspeed.launcher.launch -> 2 ranks, CPU/gloo,
    ZeRO-2): a signal to the runner process only kills it alone (it forwards nothing); the ranks see
    it gone, stop like on SIGTERM, and deepspeed.launcher.launch exits on their failure."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           TRAIN, *args(out), "--deepspeed", str(ROOT / "configs" / "ds_zero2.json")]
    output = launcher_test(cmd, out, sig)
    assert "stopping this rank" in output and "stopped by SIGTERM" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_torchrun_stops_both_ranks(tmp_path, sig):
    """torchrun forwards the signal to its ranks (each in a session of its own)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), TRAIN, *args(out)]
    launcher_test(cmd, out, sig)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
