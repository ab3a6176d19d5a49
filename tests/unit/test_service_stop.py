"""Service.stop ends everything its session left running, not only the first process group."""

import os
import subprocess
import sys
import time

from scalelab.cluster.services import Service, session_members

# A leader that starts a child in a process group of its own, as Ray Serve's proxy starts HAProxy.
LEADER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], process_group=0)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def test_stop_ends_a_child_in_another_process_group_of_the_session():
    proc = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(proc.stdout.readline())
    assert os.getpgid(child) != os.getpgid(proc.pid)  # killpg of the leader's group alone misses it
    assert session_members(proc.pid) == [child]

    Service("leader", proc.pid, "", "").stop(timeout=5)

    assert proc.poll() is not None
    deadline = time.time() + 5
    while time.time() < deadline and session_members(proc.pid):
        time.sleep(0.1)
    assert session_members(proc.pid) == []
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    import psutil

    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
