"""The documented cluster entrypoints on a real two-node Ray (a head with token auth taking `ray job
submit`, a worker node) and a real `mlflow server`: the cluster README's command and the KubeRay
RayJob's, with the project's own runtime envs."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from leftovers import MARK, marked_env, marked_pids
from ports import free_port

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
PY = sys.executable
BIN = Path(PY).parent


def _stop_tree(pids: list[int]) -> None:
    """Stop what we started, by PID (never `ray stop`: it kills every Ray on the machine)."""
    procs = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs |= {p.pid: p for p in [root] + root.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # it ended between the wait and the kill
            pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'db.sqlite'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server not healthy: " + (tmp / "server.log").read_text()[-2000:])
        yield url
    finally:
        _stop_tree([proc.pid])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node Ray cluster on this box shaped like the shipped ones: a head that offers no CPUs for
    work (the driver runs there) and a worker node started by its own `ray start`, token auth on.

    The head's environment claims a GPU (DS_ACCELERATOR=cuda, CUDA_VISIBLE_DEVICES=0), as on a driver
    that sees a GPU; the worker node's does not, and only it has DSBS_TEST_NODE=worker. Nodes join on
    this box's own address (Ray rewrites a 127.0.0.1 bootstrap address to it); the dashboard, where
    jobs are submitted, listens on 127.0.0.1 only. Stopped by the PIDs of its own processes."""
    tmp = tmp_path_factory.mktemp("cluster")
    home = tmp / "home"
    home.mkdir()
    gen = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, text=True,
                         env=dict(os.environ, HOME=str(home)))
    token = gen.stdout.strip().splitlines()[-1] if gen.returncode == 0 else secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")}
    mark_env, marker = marked_env()  # every process of this cluster carries it, whatever its command line
    base |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}",
             MARK: mark_env[MARK]}
    head_env = base | {"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "0"}
    worker_env = base | {"DSBS_TEST_NODE": "worker"}
    # short: Ray's socket paths have a length limit. A temp dir per node: on one box, nodes sharing one
    # would also share runtime-env copies, and one node's cleanup would delete the other's working dir
    temp_dir = Path("/tmp") / f"rt{secrets.token_hex(3)}"
    worker_temp_dir = Path(f"{temp_dir}w")
    port, dash = free_port(), free_port()

    def own_ports() -> list[str]:  # Ray's defaults are fixed (agent 52365): another Ray on the box may hold them
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def pids() -> list[int]:  # this cluster's processes: the ones started with its temp dirs, and any other
        # carrying its marker (Ray's client server names neither temp dir and is re-parented to init)
        by_dir = {p.pid for p in psutil.process_iter(["cmdline"])
                  if any(str(temp_dir) in a for a in (p.info["cmdline"] or []))}
        return sorted(by_dir | set(marked_pids(marker)))

    try:
        head = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=0",
                               "--object-store-memory=200000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                               *own_ports()], capture_output=True, text=True, env=head_env, timeout=120)
        assert head.returncode == 0, head.stderr[-3000:]
        gcs = re.search(r"--address='([^']+)'", head.stdout + head.stderr).group(1)
        worker = subprocess.run([str(BIN / "ray"), "start", f"--address={gcs}", "--num-cpus=2",
                                 "--node-name=dsbs-worker", "--object-store-memory=200000000",
                                 f"--temp-dir={worker_temp_dir}", *own_ports(), "--disable-usage-stats"],
                                capture_output=True, text=True, env=worker_env, timeout=120)
        assert worker.returncode == 0, worker.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        nodes = json.loads(subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", address, "--format", "json"],
                                          capture_output=True, text=True, env=base, timeout=60).stdout)
        head_node = next(n for n in nodes if n["is_head_node"])
        worker_node = next(n for n in nodes if n["node_name"] == "dsbs-worker")
        assert head_node["resources_total"].get("CPU", 0) == 0 and worker_node["resources_total"]["CPU"] == 2
        for _ in range(60):  # the head's job agent comes up a little after `ray start` returns
            ready = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                                   capture_output=True, text=True, env=base, timeout=120)
            if ready.returncode == 0:
                break
            time.sleep(2)
        else:
            agent_log = "".join(p.read_text()[-2000:] for p in temp_dir.glob("session_latest/logs/dashboard_agent*.log"))
            pytest.fail("the head never took a job: " + (ready.stdout + ready.stderr)[-1500:] + "\nhead agent log: "
                        + agent_log)
        yield {"env": base, "address": address, "token": token, "pids": pids, "worker_node": worker_node["node_id"]}
    finally:
        _stop_tree(pids())
        subprocess.run(["rm", "-rf", str(temp_dir), str(worker_temp_dir)])


def _shared(tmp: Path, data_dir: Path) -> Path:
    """A stand-in for the cluster's shared volume (/mnt/shared): data (a link to the test data), caches, runs."""
    shared = tmp / "shared"
    shared.mkdir()
    (shared / "data").symlink_to(data_dir)
    return shared


def _rewrite(text: str, shared: Path, tracking_uri: str) -> str:
    """Only what a user points at their own cluster: the shared volume and the tracking server."""
    return text.replace("/mnt/shared", str(shared)).replace("http://mlflow.internal:5000", tracking_uri)


def _job_sweep(tmp: Path, tiny: dict, name: str, **overrides) -> Path:
    """A small sweep file with no data dir, store or output dir of its own: the job's runtime env and
    entrypoint say where those are, as on the shipped clusters."""
    cfg = yaml.safe_load((REPO / "sweeps" / "local.yaml").read_text())
    cfg |= {"name": name, "students": [{"id": str(tiny["t5-tiny-s"]), "workers": 2, "cpus_per_worker": 0.5,
                                        "zero": "2"}],
            "fractions": [0.25], "methods": ["dsbs-gold"], "max_steps": 10, "eval_every": 10, "eval_limit": 8, "test_limit": 8,
            "gen_max_length": 16, "teacher": "released", "rationale_filter": "none", "train_limit": None} | overrides
    for key in ("data_dir", "output_dir", "tracking_uri"):
        cfg.pop(key, None)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ran_on_the_worker_node(result: dict, cluster: dict) -> None:
    """The trial trained on the worker node, on the device and DeepSpeed accelerator that node has, not the
    ones the driver's environment claims (a GPU)."""
    assert result["node_id"] == cluster["worker_node"]
    assert result["device"] == "cpu" and result["deepspeed_accelerator"] == "cpu" and result["precision"] == "fp32"


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def _kill_a_train_worker(root_pids: list[int]) -> int | None:
    """SIGKILL one Ray Train worker among the descendants of root_pids; its PID, or None if none runs."""
    for root in root_pids:
        try:
            for p in psutil.Process(root).children(recursive=True):
                if any("RayTrainWorker" in a for a in p.cmdline()):
                    p.kill()
                    return p.pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_cluster_runtime_env_submit_runs_on_the_worker_node_with_a_retry(cluster, mlflow_server, tmp_path, students,
                                                                          data_dir):
    """The cluster README's command, `ray job submit --runtime-env cluster/runtime_env.yaml -- python -m
    dsbs_ray sweep FILE --output-dir SHARED/sweeps`, with the project's own runtime env (only its shared
    paths and tracking server rewritten). One trial, 2 workers, ZeRO-2; a Train worker is SIGKILLed
    after the first checkpoint: Tune retries the trial, which resumes from it. The job succeeds, the
    trial ran on the worker node, and its run is on the MLflow server."""
    shared = _shared(tmp_path, data_dir)
    path = _job_sweep(tmp_path, students, "job-test", max_steps=20, eval_every=5, checkpoint_every=5, max_retries=1)
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(_rewrite((REPO / "cluster" / "runtime_env.yaml").read_text(), shared, mlflow_server))
    out = shared / "sweeps"
    submit = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--runtime-env",
                               str(runtime_env), "--", "python", "-m", "dsbs_ray", "sweep", str(path), "--output-dir",
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cluster["env"], cwd=REPO)
    killed, deadline = None, time.time() + 400
    while killed is None and time.time() < deadline and submit.poll() is None:
        if list(out.glob("job-test/*/checkpoint_manager_snapshot.json")):  # a checkpoint is registered
            killed = _kill_a_train_worker(cluster["pids"]())
        time.sleep(0.2)
    log, _ = submit.communicate(timeout=600)
    assert killed, "no Ray Train worker was found to kill: " + log[-3000:]
    assert submit.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    result = json.loads(next(out.glob("job-test/*/result.json")).read_text())
    assert result["steps"] == 20 and result["resumed_from_step"] >= 5
    _ran_on_the_worker_node(result, cluster)
    assert list((shared / "dsbs-cache" / "tokens").glob("*.pt"))  # the runtime env's shared cache was used

    # without the token the head refuses the same client
    no_token = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster["address"]],
                            capture_output=True, text=True, env=no_token, timeout=60)
    assert denied.returncode != 0

    # the runs, over the tracking server's REST API: one run for the trial, retry included
    exp = _rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=job-test")["experiment"]
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`dsbs.role` = 'trial'"})["runs"]
    assert len(runs) == 1
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert params["method"] == "dsbs-gold" and tags["dsbs.workers"] == "2" and tags["dsbs.zero"] == "2"
    assert tags["dsbs.node_id"] == cluster["worker_node"] and tags["dsbs.device"] == "cpu"
    assert runs[0]["info"]["status"] == "FINISHED" and 0.0 <= metrics["accuracy"] <= 1.0


def test_kuberay_rayjob_entrypoint_and_runtime_env_run_on_the_cluster(cluster, mlflow_server, tmp_path, students,
                                                                     data_dir):
    """The KubeRay RayJob's entrypoint and runtimeEnvYAML, submitted as KubeRay submits them (the repo
    stands in for the image's copy; the shared volume and tracking server rewritten; the entrypoint's
    sweep file is a small one). ZeRO-3 across the worker node's two workers."""
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    shared = _shared(tmp_path, data_dir)
    path = _job_sweep(tmp_path, students, "rayjob-test", students=[
        {"id": str(students["t5-tiny-s"]), "workers": 2, "cpus_per_worker": 0.5, "zero": "3"}])
    runtime_env = yaml.safe_load(_rewrite(job["spec"]["runtimeEnvYAML"], shared, mlflow_server))
    runtime_env["working_dir"] = str(REPO)
    entrypoint = _rewrite(job["spec"]["entrypoint"], shared, mlflow_server).replace("sweeps/paper.yaml", str(path))
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--runtime-env-json",
                        json.dumps(runtime_env), "--", *entrypoint.split()], capture_output=True, text=True,
                       env=cluster["env"], timeout=600)
    assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-4000:]
    result = json.loads(next((shared / "sweeps").glob("rayjob-test/*/result.json")).read_text())
    _ran_on_the_worker_node(result, cluster)
    assert result["max_rank_loaded_parameters"] < result["parameters"]  # ZeRO-3 loaded partitioned
    exp = _rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=rayjob-test")["experiment"]
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`dsbs.role` = 'trial'"})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
