"""A private SLURM cluster on this machine for tests: munged, slurmctld and one slurmd per node, all under one
directory, on free ports, stopped with every process they started (tests/install_slurm.sh installs SLURM).

    with slurm_cluster(tmp_path, nodes=2) as cluster:
        job = cluster.sbatch("--nodes", "2", "--wrap", "srun hostname")
        cluster.wait_job(job)

How it runs (Debian 12, slurm-wlm 22.05.8, munge 0.5.15, as root in a container):
- munged runs on its own key, socket, pid and seed files, in the foreground (its log goes to log/munged.out);
  `--force` because pytest's base temporary directory is mode 700 and munged otherwise exits with "Socket is
  inaccessible: execute permissions for all required on <dir>". It runs as root without complaint. slurm.conf's
  `AuthInfo=socket=...` points every SLURM program (daemons, clients, slurmstepd) at that socket.
- Several slurmd on one host: Debian's build supports `slurmd -N <node>`; each NodeName has its own Port and
  NodeAddr=127.0.0.1, and the spool, log and pid paths take %n.
- No cgroups: ProctrackType=proctrack/pgid, TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none.
- Accounting without slurmdbd: JobCompType=jobcomp/filetxt and `sacct --completion` (`sacct -c`) read the finished
  jobs from that file (22.05 has no accounting_storage/filetxt any more).
- SlurmctldHost must be this machine's short hostname (or localhost): otherwise slurmctld exits with "This host
  (vm/vm) not a valid controller". Nodes need no name resolution: NodeAddr is 127.0.0.1.
- slurmstepd daemonizes (its parent becomes PID 1), so stop() finds it, and the job's tasks, by a marker variable
  in their environment rather than by process group.
- Nodes declare CPUs/GPUs (SlurmdParameters=config_overrides; GPUs are GRES on empty files, as slurmd drops a
  file-less GPU), so a job header like examples/launch/slurm.sbatch's (--gpus-per-node=8 --cpus-per-task=32
  --exclusive) is accepted on a 2-core machine without GPUs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "srun", "scancel")
SEARCH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin"
MARK = "LLAMAPRO_SLURM_CLUSTER"  # in every daemon's and job's environment: how stop() finds what is left


def binaries() -> dict[str, str]:
    """Paths of the daemons and clients; pytest.skip naming the missing ones (tests/install_slurm.sh installs)."""
    found = {name: shutil.which(name, path=SEARCH) for name in DAEMONS + CLIENTS + ("munge",)}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        pytest.skip(f"SLURM not installed (no {', '.join(missing)}; run tests/install_slurm.sh as root)")
    return found  # type: ignore[return-value]


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (all held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def write_conf(root: Path, nodes: list[str], cpus: int, gpus: int, munge_socket: Path) -> Path:
    """slurm.conf (and gres.conf) for a cluster of `nodes` on this host, every path under root, ports chosen now.
    Nodes have the CPUs and GPUs declared here, not the machine's (config_overrides; GPUs without device files)."""
    ctld_port, *node_ports = free_ports(1 + len(nodes))
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=llamapro-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={munge_socket}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmdParameters=config_overrides",  # trust CPUs= over the hardware: a job may ask for 32 on 2 cores
        *(["GresTypes=gpu"] if gpus else []),
        "MailProg=/bin/true",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/pgid",  # no cgroups in a container
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",  # what `sacct --completion` reads: no slurmdbd needed
        f"JobCompLoc={root}/log/jobcomp.txt",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MinJobAge=300",  # finished jobs stay in slurmctld (scontrol show job, squeue -j) for the test to look at
        "KillWait=2",
        *(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus}"
          f"{f' Gres=gpu:{gpus}' if gpus else ''} State=UNKNOWN"
          for node, port in zip(nodes, node_ports)),
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
    ]
    if gpus:
        for index in range(gpus):  # slurmd drops a GPU without a device file; a plain file is enough
            (root / "dev" / f"gpu{index}").touch()
        (root / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={root}/dev/gpu[0-{gpus - 1}]\n")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class SlurmCluster:
    """A running cluster: env is what clients need (SLURM_CONF and the marker); run() runs one with it. Jobs get
    the submitting client's environment (sbatch --export=ALL), so add to env what jobs need (PATH, MASTER_ADDR)."""

    root: Path
    conf: Path
    nodes: list[str]
    env: dict[str, str]
    bins: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, name: str, *args: str, check: bool = True, timeout: float = 30, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One client command (sbatch, squeue, ...) against this cluster, in cwd (a job's SLURM_SUBMIT_DIR; default
        the cluster's directory), with `env` added to the cluster's (a job gets it); stdout and stderr as text."""
        return subprocess.run([self.bins[name], *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, check=check, timeout=timeout, cwd=cwd or self.root)

    def start(self, name: str, *args: str) -> None:
        """A daemon in the foreground (so its Popen is the daemon itself), output into log/<name>.out."""
        out = open(self.root / "log" / f"{name}.out", "ab")  # the child keeps its own copy of the descriptor
        self.procs[name] = subprocess.Popen(list(args), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def check_alive(self) -> None:
        """Fail with the daemon's log where one has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.logs()}")

    def logs(self) -> str:
        """Every daemon log, for failure messages."""
        return "\n".join(f"== {path.name}\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted((self.root / "log").glob("*")) if path.is_file())

    def wait_until_idle(self, timeout: float = 30) -> None:
        """Until sinfo shows every node idle (slurmd registered with slurmctld)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            idle = {line.split()[0] for line in states if line.endswith(" idle")}
            if idle >= set(self.nodes):
                return
            time.sleep(0.3)
        raise TimeoutError(f"nodes not idle after {timeout} s: {states}\n{self.logs()}")

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """Submit a job (from cwd, with env: see run()); its id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def squeue_state(self, job: str) -> str:
        """The job's state in squeue ('' once it has left the queue)."""
        return self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()

    def wait_job(self, job: str, timeout: float = 60) -> list[str]:
        """Until the job has finished; every distinct state squeue showed for it on the way."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            state = self.squeue_state(job)
            if state and state not in seen:
                seen.append(state)
            if state in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return seen
            time.sleep(0.2)
        raise TimeoutError(f"job {job} still {seen[-1:]} after {timeout} s\n{self.logs()}")

    def sacct(self, job: str) -> list[list[str]]:
        """The job's completion records (`sacct --completion`): rows of JobID, JobName, State, ExitCode, NNodes."""
        out = self.run("sacct", "--completion", "-n", "-P", "-j", job,
                       "-o", "JobID,JobName,State,ExitCode,NNodes").stdout
        return [line.split("|") for line in out.splitlines() if line]

    def stop(self) -> None:
        """Cancel the jobs (and let SLURM end them), stop the daemons (TERM, then KILL), then kill whatever still
        carries the marker until nothing does."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            _until(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), timeout=15)
        for name in ("slurmd", *reversed(list(self.procs))):  # the slurmds first, munged last
            for key, proc in self.procs.items():
                if key.startswith(name) and proc.poll() is None:
                    _terminate(proc)

        def killed() -> bool:
            pids = self.processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not pids

        _until(killed, timeout=10)

    def processes(self) -> list[int]:
        """Live processes of this cluster (daemons, slurmstepd, job tasks): those carrying its marker."""
        return _marked(self.env[MARK])


def _until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll done() until it is true or timeout seconds have passed; whether it came true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(proc: subprocess.Popen, wait: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries MARK=mark (a zombie's environ reads empty: dead ones are left out)."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def start_munged(cluster: SlurmCluster, munge_dir: Path) -> None:
    """A private munged: its own key, and a socket the cluster's conf names (AuthInfo=socket=)."""
    munge_dir.mkdir(mode=0o700)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket"
    cluster.start("munged", cluster.bins["munged"], "--foreground", "--force", f"--socket={socket_path}",
                  f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed")
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        cluster.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"munged made no socket\n{cluster.logs()}")
        time.sleep(0.05)


@contextlib.contextmanager
def slurm_cluster(tmp_dir: Path, nodes: int = 2, cpus_per_node: int = 1,
                  gpus_per_node: int = 0) -> Iterator[SlurmCluster]:
    """A cluster of `nodes` nodes (node1, node2, ...) of `cpus_per_node` CPUs and `gpus_per_node` GPUs (GRES without
    devices: allocation only) each, idle on entry, all of its processes gone on exit (failure included). Skips where
    SLURM is not installed."""
    bins = binaries()
    root = Path(tmp_dir) / "slurm"
    for sub in ("state", "spool", "run", "log", "dev"):
        (root / sub).mkdir(parents=True)
    names = [f"node{i + 1}" for i in range(nodes)]
    for name in names:
        (root / "spool" / name).mkdir()
    conf = write_conf(root, names, cpus_per_node, gpus_per_node, root / "munge" / "munge.socket")
    env = {**os.environ, "SLURM_CONF": str(conf), MARK: str(root)}
    for var in [var for var in env if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_"))]:
        if var != "SLURM_CONF":  # a surrounding allocation's settings would steer the clients
            del env[var]
    cluster = SlurmCluster(root, conf, names, env, bins)
    try:
        start_munged(cluster, root / "munge")
        cluster.start("slurmctld", bins["slurmctld"], "-D", "-f", str(conf))
        for name in names:
            cluster.start(f"slurmd-{name}", bins["slurmd"], "-D", "-f", str(conf), "-N", name)
        cluster.wait_until_idle()
        yield cluster
    finally:
        cluster.stop()
