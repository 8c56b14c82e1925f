"""A throw-away SLURM cluster on localhost for the live tests: munged, slurmctld and one slurmd
per "node" (each on its own port), all configured, logging and keeping state in one temporary
folder, started as child processes and stopped by pid.

Needs the Debian packages `slurmctld slurmd slurm-client munge` (22.05 was used) and root (the
daemons switch to no other user). Jobs run as root too, so the trainer sees the same files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sacct", "squeue", "scancel")


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`nodes` slurmd daemons named n1, n2, ... on this host, each with `cpus` CPUs (may be more
    than the machine has), in two partitions: `batch` (default, every node; jobs requeue on
    preemption) and `urgent` (`urgent_nodes`, default every node; higher priority tier: a job
    there preempts `batch` jobs, which get `grace` seconds between SIGTERM and SIGKILL)."""

    def __init__(
        self, root: Path, nodes: int = 1, cpus: int = 2, grace: int = 60, urgent_nodes: list[str] | None = None
    ):
        self.root = root
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.urgent_nodes = urgent_nodes or self.nodes
        self.cpus = cpus
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
            for n in self.nodes:
                self._spawn(["slurmd", "-D", "-N", n, "-f", str(self.conf)], f"slurmd-{n}")
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
                states = dict(zip(out[::2], out[1::2]))
                if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                    return self
                self._check_alive()
                time.sleep(0.5)
            raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {states}\n{self.logs()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL what jobs still run, then SIGTERM each daemon by pid (newest first) and
        SIGKILL what is left after 10 s."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", "--signal=KILL", *jobs, check=False)
                end = time.monotonic() + 15
                while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < end:
                    time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], name: str) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _check_alive(self) -> None:
        dead = [p.args[0] if isinstance(p.args, list) else p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"SLURM daemon(s) {dead} exited\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",  # root-owned files in a temp folder
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
                f"--log-file={d / 'munged.log'}",
            ],
            "munged",
        )
        end = time.monotonic() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > end:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir()
        for n in self.nodes:
            (r / "spool" / n).mkdir(parents=True)
        ctld_port = _free_port()
        host = socket.gethostname()
        lines = [
            "ClusterName=dlmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'spool'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=5",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'jobcomp.txt'}",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # nodes may claim more CPUs than the machine has
            "JobRequeue=1",
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "PreemptExemptTime=0",
        ]
        for n in self.nodes:
            lines.append(
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} RealMemory=16000 State=UNKNOWN"
            )
        nodes = ",".join(self.nodes)
        lines += [
            f"PartitionName=batch Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            f"PreemptMode=REQUEUE GraceTime={self.grace} OverSubscribe=NO",
            f"PartitionName=urgent Nodes={','.join(self.urgent_nodes)} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- client commands

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=cwd)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}\n{self.logs()}")
        return p

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        p = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=cwd,
        )
        if p.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """scontrol's view of a job (JobState, Restarts, ExitCode, ...); {} once it is purged."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout.strip()
        fields = {}
        for item in out.split():
            k, _, v = item.partition("=")
            fields[k] = v
        return fields

    def wait_state(self, job_id: int | str, states: set[str], timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}\n{self.logs()}")
