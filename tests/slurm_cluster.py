"""A throwaway one-node Slurm cluster for tests: real munged, slurmctld and slurmd.

Everything lives in one base directory (config, state, spool, logs, munge
socket) with its own ports on 127.0.0.1; no systemd and no system config is
touched. Client commands find the cluster through ``SLURM_CONF``
(:meth:`SlurmCluster.env`). The daemons run in the foreground as children of
the test process and are stopped by PID (also at interpreter exit).
Binaries missing: run ``scripts/install_system_deps.sh`` as root.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from servers import INSTALL_HINT, ServerError, free_port

__all__ = ["SlurmCluster"]

_READY_TIMEOUT_S = 60.0
_MUNGE_KEY = Path("/etc/munge/munge.key")

_CONF = """\
ClusterName=stagetune-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
CommunicationParameters=NoInAddrAny
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise ServerError(f"{name} is not installed; {INSTALL_HINT}")
    return path


class SlurmCluster:
    """munged + slurmctld + slurmd for one node (``localhost``) with ``cpus`` CPUs."""

    def __init__(self, cpus: int = 2) -> None:
        if os.geteuid() != 0:
            raise ServerError("the test Slurm cluster runs its daemons as root (as CI does)")
        self.base_dir = Path(tempfile.mkdtemp(prefix="stagetune-slurm-"))
        self.conf = self.base_dir / "slurm.conf"
        self.cpus = cpus
        self._procs: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scancel, sinfo)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def _daemon(self, command: list[str], log: str, user: pwd.struct_passwd | None = None) -> None:
        as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with (self.base_dir / log).open("wb") as out:
            self._procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **as_user))

    def start(self) -> None:
        """Write the config, start the daemons and wait until the node is idle."""
        base = self.base_dir
        for sub in ("state", "spool", "munge"):
            (base / sub).mkdir()
        os.chmod(base, 0o755)  # munged (user munge) reaches its socket directory through it
        munge = pwd.getpwnam("munge")
        os.chown(base / "munge", munge.pw_uid, munge.pw_gid)
        os.chmod(base / "munge", 0o755)  # munged wants the socket's directory searchable by all
        if not _MUNGE_KEY.exists():
            raise ServerError(f"no munge key at {_MUNGE_KEY}; {INSTALL_HINT}")
        self.conf.write_text(
            _CONF.format(base=base, ctld_port=free_port(), d_port=free_port(), cpus=self.cpus)
        )
        atexit.register(self.stop)
        self._daemon(
            [_binary("munged"), "--foreground",
             f"--socket={base}/munge/munge.socket", f"--pid-file={base}/munge/munged.pid",
             f"--log-file={base}/munge/munged.log", f"--seed-file={base}/munge/seed",
             f"--key-file={_MUNGE_KEY}"],
            "munged.out",
            user=munge,
        )
        self._wait("munged", lambda: (base / "munge" / "munge.socket").exists())
        self._daemon([_binary("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
        self._daemon([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"], "slurmd.out")
        self._wait("the Slurm node", lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle")

    def _wait(self, what: str, ready: object) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not ready():  # type: ignore[operator]
            dead = [p.args[0] for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}"
                    for p in sorted(self.base_dir.glob("*.out"))
                )
                self.stop()
                raise ServerError(f"{what} did not come up (exited: {dead}):\n{logs}")
            time.sleep(0.2)

    def run(
        self, *command: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (``env``: extra variables)."""
        return subprocess.run(
            list(command), env=self.env(**(env or {})), capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons by PID (slurmd, slurmctld, munged), clean up."""
        if self._procs and all(p.poll() is None for p in self._procs):
            self.run("scancel", "--full", "--user", "root", timeout=30)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", timeout=30).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.base_dir, ignore_errors=True)
