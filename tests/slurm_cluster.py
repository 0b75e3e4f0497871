"""A real single-node SLURM cluster for tests (root only): Debian's slurm-wlm + munge.

    with SlurmCluster(scratch_dir, partition="batch") as cluster:
        ...  # sbatch / snakemake --executor slurm; cluster.jobs() -> `scontrol show job` records

What it does (measured recipe: one node, fake GPUs, no accounting):
- installs `slurm-wlm munge` with apt-get when `slurmctld` is missing (about 8 s);
- writes slurm.conf and gres.conf into the scratch dir and symlinks them as /etc/slurm/slurm.conf
  and /etc/slurm/gres.conf (the executor plugin's job step strips SLURM_CONF, so the config must
  be at the default path); existing files there are moved aside and put back by stop();
- fake GPUs: `GresTypes=gpu`, `Gres=gpu:fake:N` and a gres.conf with `AutoDetect=off` whose
  `File=` lines point at character devices made with mknod (a Count= only gres.conf leaves the
  node INVAL); SLURM then sets CUDA_VISIBLE_DEVICES in GPU jobs;
- `MinJobAge=3600` so finished jobs stay visible to squeue / scontrol (the profile uses
  `slurm-status-command: squeue`; there is no slurmdbd, so sacct cannot answer);
- starts munged (unless one already answers), slurmctld and slurmd, waits until `sinfo` shows the
  node idle; stop() cancels every job of this cluster and ends the daemons it started by their
  pidfiles (never by name).

Run by hand: python tests/slurm_cluster.py start DIR   /   python tests/slurm_cluster.py stop DIR
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

ETC = Path("/etc/slurm")
MUNGE_PID = Path("/run/munge/munged.pid")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: int, wait: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `wait` seconds."""
    for sig, limit in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root (starts slurmctld, slurmd and munged)"
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get"
    return None


def install(timeout: float = 600) -> None:
    """apt-get install slurm-wlm munge when missing (installing starts no daemon)."""
    if all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"],
                timeout=timeout, check=False, env=env)
    if proc.returncode != 0:  # stale package lists
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], timeout=timeout, env=env)
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"],
             timeout=timeout, env=env)


def _mem_mb() -> int:
    info = Path("/proc/meminfo").read_text()
    avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", info).group(1))
    # jobs of this project ask for up to 4000 MB each; nothing enforces memory here (no cgroups),
    # and config_overrides lets slurmd accept a configured size above the real one
    return max(avail_kb // 1024 - 1024, 8192)


class SlurmCluster:
    """One node (this host) in one partition, with `gpus` fake GPUs; see the module docstring."""

    def __init__(self, scratch: Path | str, partition: str = "batch", gpus: int = 2, cpus: int | None = None):
        self.dir = Path(scratch).resolve()
        self.partition = partition
        self.gpus = gpus
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.started_munge = False
        self.state_file = self.dir / "cluster.json"

    # ------------------------------------------------------------------------ config files

    def slurm_conf(self) -> str:
        d = self.dir
        return "\n".join([
            "# written by tests/slurm_cluster.py: a single-node test cluster",
            "ClusterName=stitchcache",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay in squeue/scontrol for the whole test
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd.log",
            "GresTypes=gpu",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()}"
            f" Gres=gpu:fake:{self.gpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def gres_conf(self) -> str:
        lines = ["AutoDetect=off"]
        lines += [f"NodeName={self.host} Name=gpu Type=fake File={self.dir}/fakegpu{i}" for i in range(self.gpus)]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            dev = self.dir / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        (self.dir / "slurm.conf").write_text(self.slurm_conf())
        (self.dir / "gres.conf").write_text(self.gres_conf())
        ETC.mkdir(parents=True, exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            link, backup = ETC / name, ETC / f"{name}.stitchcache-backup"
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                link.rename(backup)
            link.symlink_to(self.dir / name)

    def _restore_config(self) -> None:
        for name in ("slurm.conf", "gres.conf"):
            link, backup = ETC / name, ETC / f"{name}.stitchcache-backup"
            if link.is_symlink() and Path(os.readlink(link)).parent == self.dir:
                link.unlink()
                if backup.exists():
                    backup.rename(link)

    # ------------------------------------------------------------------------ daemons

    def _munge_ok(self) -> bool:
        if shutil.which("munge") is None:
            return False
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=5)
            return dec.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _start_munge(self) -> None:
        if self._munge_ok():
            return  # someone else's munged: use it, leave it running
        if not MUNGE_KEY.exists():
            _run(["mungekey", "-c", "-k", str(MUNGE_KEY)])
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        self.started_munge = True
        self._wait(self._munge_ok, 10, "munged does not answer")

    def _wait(self, ok, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{message} (after {timeout:.0f} s; logs in {self.dir})")

    def _controller_up(self) -> bool:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout.count("UP") > 0

    def node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
        return proc.stdout.strip()

    def start(self, timeout: float = 60) -> "SlurmCluster":
        install()
        if shutil.which("scontrol") and _read_pid(self.dir / "slurmctld.pid") is None:
            if (ETC / "slurm.conf").exists() and self._controller_up():
                raise RuntimeError("a SLURM controller already answers here; not starting a second one")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        try:
            self._start_munge()
            self._save_state()
            _run(["slurmctld"])  # daemonises; pid in slurmctld.pid
            self._wait(self._controller_up, timeout, "slurmctld does not answer")
            _run(["slurmd"])
            self._wait(lambda: self.node_state() == "idle", timeout,
                       "the node does not become idle (sinfo: %s)" % self.node_state())
        except BaseException:
            self.stop()
            raise
        return self

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({"started_munge": self.started_munge}))

    def stop(self) -> None:
        """Cancel this cluster's jobs, end the daemons started here (by pidfile), restore /etc/slurm."""
        if self.state_file.exists():
            self.started_munge = json.loads(self.state_file.read_text()).get("started_munge", False)
        slurmctld_pid = _read_pid(self.dir / "slurmctld.pid")
        if slurmctld_pid and _alive(slurmctld_pid) and shutil.which("squeue"):
            try:
                ids = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%A"], capture_output=True,
                                     text=True, timeout=10).stdout.split()
                if ids:
                    subprocess.run(["scancel", *ids], capture_output=True, timeout=10)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and subprocess.run(
                            ["squeue", "-h", "-t", "R,CG", "-o", "%A"], capture_output=True, text=True,
                            timeout=10).stdout.strip():
                        time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd.pid", "slurmctld.pid"):
            pid = _read_pid(self.dir / name)
            if pid and _alive(pid):
                _stop_pid(pid)
        if self.started_munge:
            pid = _read_pid(MUNGE_PID)
            if pid and _alive(pid):
                _stop_pid(pid)
            self.started_munge = False
        self.state_file.unlink(missing_ok=True)
        self._restore_config()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------ queries

    def jobs(self) -> list[dict[str, str]]:
        """`scontrol show job -d -o` of every job the controller still knows (MinJobAge=3600),
        one dict per job (KEY=VALUE fields; the multi-word `Command=`... fields are best effort)."""
        out = _run(["scontrol", "show", "job", "-d", "-o"], timeout=20).stdout
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            rec = {}
            for m in re.finditer(r"(\S+?)=(\S*)", line):
                rec.setdefault(m.group(1), m.group(2))
            jobs.append(rec)
        return jobs


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[-1].strip())
        return 2
    cluster = SlurmCluster(argv[1], partition=argv[2] if len(argv) > 2 else "batch")
    if argv[0] == "start":
        why = available()
        if why:
            print(why)
            return 1
        cluster.start()
        print(f"SLURM up: partition {cluster.partition}, {cluster.cpus} CPUs, {cluster.gpus} fake GPUs; "
              f"stop with: python {sys.argv[0]} stop {cluster.dir}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
