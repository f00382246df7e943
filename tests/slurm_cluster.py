"""A real, throwaway SLURM cluster on this host for the `slurm` tests (Debian's SLURM 22.05, as root).

One controller and three slurmd on 127.0.0.1: node `solo` (2 CPUs, partition `single`) and two emulated nodes
`n1`, `n2` (1 CPU each, partition `multi`, the default). Everything lives under STATE_DIR (config, munge key
and socket, spool, logs, PID files); /etc is not touched. Daemons are started in the foreground as children of
the test process and stopped by PID, also at the next start if a crashed session left PID files behind.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged", "/usr/sbin/mungekey"]
STATE_DIR = Path("/tmp/ldmlab-slurm-test")  # fixed, so a later session can find and stop stale daemons
CTLD_PORT, NODE_PORTS = 16817, {"solo": 16818, "n1": 16819, "n2": 16820}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
ClusterName=ldmlabtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
# munge on a private socket; cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s: the "~2 minutes" a requeue takes under Debian's defaults)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge/munge.socket,cred_expire=10
# no cgroups and no systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a requeued job becomes eligible when its begin time passes, which no event announces: a 1 s main
# scheduling loop starts it at once instead of after sched_interval's default 60 s
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/jobcomp.txt
StateSaveLocation={state}/ctld
SlurmctldPidFile={state}/slurmctld.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdSpoolDir={state}/spool-%n
SlurmdPidFile={state}/slurmd-%n.pid
SlurmdLogFile={state}/slurmd-%n.log
NodeName=solo NodeHostname={host} NodeAddr=127.0.0.1 Port={solo_port} CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=multi Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
PartitionName=single Nodes=solo MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why no cluster can run here (not root, apt failed), installing the Debian packages if missing."""
    if os.geteuid() != 0:
        return "SLURM tests need root (apt-get install slurmctld slurmd slurm-client munge, daemons as root)"
    if all(Path(b).exists() for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "SLURM tests need apt-get to install Debian's slurmctld slurmd slurm-client munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-300:]}"
    missing = [b for b in BINARIES if not Path(b).exists()]
    return f"SLURM packages installed but {missing} missing" if missing else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_pid(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still alive after `timeout`; reaps it when it is our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child: poll for its exit
                if not _alive(pid):
                    return
            time.sleep(0.1)


class SlurmCluster:
    """munged + slurmctld + three slurmd under STATE_DIR; `start()`, `stop()`, and client helpers."""

    def __init__(self, state: Path = STATE_DIR) -> None:
        self.state = state
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
        self._lock: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Write the config, start munged, slurmctld and the slurmd; wait until every node is idle."""
        self.state.mkdir(mode=0o755, exist_ok=True)
        self._lock = os.open(self.state / ".lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one test cluster per host at a time
        except BlockingIOError:
            raise RuntimeError(f"another session runs the test cluster in {self.state}") from None
        self._stop_daemons()  # stale ones of a crashed session
        for name in ("ctld", "munge", *(f"spool-{n}" for n in NODE_PORTS)):
            shutil.rmtree(self.state / name, ignore_errors=True)
        (self.state / "ctld").mkdir()
        (self.state / "slurm.conf").write_text(SLURM_CONF.format(
            host=self.host, state=self.state, ctld_port=CTLD_PORT, solo_port=NODE_PORTS["solo"],
            n1_port=NODE_PORTS["n1"], n2_port=NODE_PORTS["n2"]))
        try:
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_daemons(self, timeout: float) -> None:
        self._start_munge()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.state / "slurm.conf")])
        for node in NODE_PORTS:
            self._spawn(f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(self.state / "slurm.conf")])
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        """A private munged (own key and socket) run as the munge user, which munged requires."""
        munge = self.state / "munge"
        munge.mkdir()
        os.chmod(munge, 0o755)  # munged: the socket's directory must be searchable by all
        user = pwd.getpwnam("munge")
        os.chown(munge, user.pw_uid, user.pw_gid)
        key = munge / "munge.key"
        subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chown(key, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o400)
        self._spawn("munged", ["/usr/sbin/munged", "-F", f"--socket={munge}/munge.socket", f"--key-file={key}",
                               f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"], user="munge")
        self._wait_for(lambda: (munge / "munge.socket").exists(), 20, "munged socket")

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        """Start a foreground daemon and record its PID in <state>/<name>.test-pid for `stop()`."""
        log = open(self.state / f"{name}.stdout", "w")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user,
                                start_new_session=True)  # no terminal signals; we stop it ourselves
        (self.state / f"{name}.test-pid").write_text(str(proc.pid))

    def stop(self) -> None:
        """Cancel every job and wait for it to end (its slurmstepd outlives slurmd), stop the daemons by their
        PIDs, release the lock."""
        if (self.state / "slurmctld.test-pid").exists():
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30, check=False)
            deadline = time.monotonic() + 45  # KillWait (30 s) after SIGTERM, SLURM sends SIGKILL
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False, timeout=10).strip():
                time.sleep(0.5)
        self._stop_daemons()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _stop_daemons(self) -> None:
        # slurmd first (they kill their slurmstepd and jobs), then the controller, then munge
        order = sorted(self.state.glob("*.test-pid"), key=lambda p: ("slurmd" not in p.name, "munge" in p.name))
        for pid_file in order:
            pid = int(pid_file.read_text() or 0)
            if pid and _alive(pid) and self._is_daemon(pid):
                _kill_pid(pid)
            pid_file.unlink()

    @staticmethod
    def _is_daemon(pid: int) -> bool:
        """Guard against a recycled PID: only ever signal a process that runs one of our binaries."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return False
        return Path(cmdline).name in {"slurmctld", "slurmd", "munged"}

    # -- clients -----------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job; its job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until: set[str] = FINAL_STATES, timeout: float = 240) -> dict[str, str]:
        """Poll until the job's state is in `until`; its record. Fails on timeout with the job record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(until)} after {timeout}s: {info}")
            time.sleep(0.5)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, timeout=10)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return set(states) == set(NODE_PORTS) and all(s == "idle" for s in states.values())

        self._wait_for(idle, timeout, "idle nodes: " + self.logs_tail())

    @staticmethod
    def _wait_for(ok: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def logs_tail(self, chars: int = 1500) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.state.glob("*.log")) + sorted(self.state.glob("*.stdout")):
            parts.append(f"== {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)
