"""No orphans. Each training process starts a watchdog (start_guard): a small process in its own session that polls
twice a second. When the training process dies in any way (kill -9 included), or the launcher above it does, the
watchdog kills the training process and what it registered (the vLLM engine's processes) and removes the registered
files and folders (the weight staging file, the adapter folder) and the shared memory the registered processes
mapped (vLLM's queues). The launcher (torchrun) starts each rank in a session of its own, so nothing else would stop
a rank when the launcher is killed. Also here: the engine started in a session of its own (a Ctrl-C for the
trainer must not stop it mid-step), and the sweep of what a killed process tree left behind."""
import os

GUARD_SOURCE = """
import os, select, shutil, sys, time
import psutil


def alive(p):
    if p is None:
        return False
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


try:
    watched = psutil.Process(int(sys.argv[1]))
except psutil.Error:  # gone before this started: what it registered is still in the pipe, read below
    watched = None
try:
    launcher = int(sys.argv[2]) and psutil.Process(int(sys.argv[2]))
except psutil.Error:  # the launcher is gone already: so goes the rank
    launcher = None
SHARED = ("psm_", "sem.mp-")  # the names multiprocessing gives shared memory and semaphores (vLLM's queues)


def shared_memory(p):  # /proc/PID/maps: cheap to read, unlike psutil's memory_maps (smaps)
    with open(f"/proc/{p.pid}/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line}
    return {path for path in paths if os.path.basename(path).startswith(SHARED)}
procs, paths, pending, fd, shared = [], [], b"", sys.stdin.fileno(), set()
polls = 0


def registered(data, died=None):  # "pid N" and "path P" lines from the rank
    global pending
    *lines, pending = (pending + data).split(b"\\n")
    for kind, _, value in (line.decode().partition(" ") for line in lines):
        try:
            if kind == "path":
                paths.append(value)
            elif kind == "pid" and (died is None or psutil.Process(int(value)).create_time() <= died):
                procs.append(psutil.Process(int(value)))  # (read after the rank died: not a pid reused since)
        except (psutil.Error, ValueError):
            pass


while alive(watched):
    if launcher is None or (launcher and not alive(launcher)):  # the launcher is gone: the rank goes too
        procs.append(watched)
        break
    polls += 1
    for p in procs if polls % 4 == 1 else ():  # the shared memory the engine's processes map (vLLM's psm_* queues,
        try:  # semaphores): a process killed by a signal never unlinks it, and once dead its maps cannot be read
            shared |= shared_memory(p)
        except (OSError, IndexError):
            pass
    if fd is None or not select.select([fd], [], [], 0.5)[0]:
        time.sleep(0.5 if fd is None else 0)
        continue
    data = os.read(fd, 65536)
    if not data:  # the rank's end is closed
        fd = None
    registered(data)
died = time.time()
while fd is not None and select.select([fd], [], [], 0)[0]:  # what the rank registered just before it died
    data = os.read(fd, 65536)
    if not data:
        break
    registered(data, died)
for p in procs:  # psutil checks the process's start time: a recycled pid is never killed
    try:
        shared |= shared_memory(p)
    except (OSError, IndexError):
        pass
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(procs, timeout=5)
for path in paths + sorted(shared):
    try:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    except OSError:
        pass
"""
GUARD = []  # [Popen] of this process's watchdog, once started


def start_guard():
    """Starts this process's watchdog (once). Under torchrun its parent is the launcher, watched too."""
    import subprocess
    import sys
    if not GUARD:
        launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else 0
        GUARD.append(subprocess.Popen([sys.executable, "-c", GUARD_SOURCE, str(os.getpid()), str(launcher)],
                                      stdin=subprocess.PIPE, start_new_session=True))


def guard(pids=(), paths=()):
    """Registers processes to kill and files to remove when this process dies (no-op without start_guard)."""
    if GUARD and GUARD[0].poll() is None:
        GUARD[0].stdin.write("".join([f"pid {p}\n" for p in pids] + [f"path {p}\n" for p in paths]).encode())
        GUARD[0].stdin.flush()


def guard_children():
    """Registers every process this one has started so far (but its watchdog): the vLLM engine's."""
    import psutil
    mine = {g.pid for g in GUARD}
    guard(pids=[p.pid for p in psutil.Process().children(recursive=True) if p.pid not in mine])


NEW_SESSION = []  # [True] while start_vllm starts the engine: forked children begin a session of their own


def children_in_own_session():
    """Context: processes started meanwhile (vLLM's engine, by fork or spawn) run in a session of their own. torchrun
    passes Ctrl-C/SIGTERM to each rank's whole process group; the engine must not die with it while the trainer
    finishes the step to checkpoint it (the watchdog and stop_vllm still end it)."""
    import _posixsubprocess
    import contextlib
    if not getattr(children_in_own_session, "registered", False):
        os.register_at_fork(after_in_child=lambda: NEW_SESSION and os.setsid())  # the fork start method
        children_in_own_session.registered = True
    fork_exec = _posixsubprocess.fork_exec

    def fork_exec_setsid(*args):  # the spawn start method (multiprocessing.util.spawnv_passfds): call_setsid
        if len(args) == 23 and args[15] is False:
            args = args[:15] + (True,) + args[16:]
        return fork_exec(*args)

    @contextlib.contextmanager
    def scope():
        NEW_SESSION.append(True)
        _posixsubprocess.fork_exec = fork_exec_setsid
        try:
            yield
        finally:
            NEW_SESSION.clear()
            _posixsubprocess.fork_exec = fork_exec
    return scope()


def remove_stale_staging_files(folder):
    """Staging files and adapter folders of processes that are gone (killed with their watchdog, e.g. a whole tree at
    once)."""
    import glob
    import shutil
    import time
    for path in glob.glob(os.path.join(folder, "grpo_vl_weights_*.bin")) + \
            glob.glob(os.path.join(folder, "grpo_vl_adapter_*")):
        try:
            if time.time() - os.path.getmtime(path) < 600:  # in use: every copy rewrites it (and a pid from
                continue                                   # another container's namespace may look dead)
            os.kill(int(os.path.basename(path).split("_")[3]), 0)
        except ProcessLookupError:
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            except OSError:  # another run removed it first
                pass
        except (ValueError, IndexError, OSError):
            pass
