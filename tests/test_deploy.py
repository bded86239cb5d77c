"""Tests of the production deployment files in deploy/: the Prefect project file (read with Prefect's own
prefect.yaml models), the compose files (structure, and `docker compose config` where a Compose binary
exists), the Dockerfile, the worker scripts, the example Dask cluster configs and the README's commands."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PREFECT_YAML = DEPLOY / "prefect.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
POOL = "unet3d-gpu"
SERVICES = {"postgres", "prefect-server", "worker", "dask-scheduler", "dask-worker", "deploy"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def nightly() -> dict:
    deployments = load_yaml(PREFECT_YAML)["deployments"]
    matches = [d for d in deployments if d.get("name") == "nightly"]
    assert len(matches) == 1, f"expected one deployment named nightly, got {[d.get('name') for d in deployments]}"
    return matches[0]


def compose() -> dict:
    return load_yaml(COMPOSE)


def pipeline_source() -> Path:
    entry_file, _ = nightly()["entrypoint"].split(":")
    path = REPO / entry_file
    if not path.exists():
        pytest.skip(f"{entry_file} does not exist yet: the entrypoint's function cannot be checked")
    return path


def flow_function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert functions, f"{path.relative_to(REPO)} defines no top-level function {name}"
    return functions[0]


def flow_decorator(function: ast.FunctionDef) -> ast.expr | None:
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "flow") or (
                isinstance(target, ast.Attribute) and target.attr == "flow"):
            return decorator
    return None


# ---------------------------------------------------------------------------------------------------------
# prefect.yaml
# ---------------------------------------------------------------------------------------------------------
def test_prefect_yaml_passes_prefects_own_models():
    """`prefect deploy` validates prefect.yaml with these pydantic models; they ignore unknown keys, so a
    misspelt key would silently vanish: every key used must be a field they know."""
    models = pytest.importorskip("prefect.cli.deploy._models", reason="Prefect's prefect.yaml models moved")
    raw = load_yaml(PREFECT_YAML)
    project = models.PrefectYamlModel.model_validate(raw)
    assert [d.name for d in project.deployments] == [d["name"] for d in raw["deployments"]]

    known_top = set(models.PrefectYamlModel.model_fields) | {"prefect-version"}
    assert set(raw) <= known_top, f"unknown top-level keys: {set(raw) - known_top}"
    for deployment in raw["deployments"]:
        unknown = set(deployment) - set(models.DeploymentConfig.model_fields)
        assert not unknown, f"deployment {deployment['name']}: unknown keys {unknown}"
        unknown = set(deployment.get("work_pool") or {}) - set(models.WorkPoolConfig.model_fields)
        assert not unknown, f"deployment {deployment['name']}: unknown work_pool keys {unknown}"
        for schedule in deployment.get("schedules") or []:
            models.RawScheduleConfig.model_validate(schedule)
        if isinstance(deployment.get("concurrency_limit"), dict):
            unknown = set(deployment["concurrency_limit"]) - set(models.ConcurrencyLimitSpec.model_fields)
            assert not unknown, f"unknown concurrency_limit keys {unknown}"


def test_nightly_runs_at_two_in_an_explicit_timezone():
    from prefect.client.schemas.schedules import CronSchedule

    schedules = nightly()["schedules"]
    assert len(schedules) == 1
    schedule = schedules[0]
    assert schedule["cron"] == "0 2 * * *"
    assert schedule.get("timezone"), "the cron needs an explicit timezone, or it is read in UTC"
    built = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # rejects unknown zones
    assert built.timezone == schedule["timezone"]


def test_nightly_targets_the_pipeline_flow_with_its_parameters():
    deployment = nightly()
    entry_file, function = deployment["entrypoint"].split(":")
    assert (entry_file, function) == ("flows/pipeline.py", "pipeline_flow")
    parameters = deployment["parameters"]
    assert parameters["config_path"].endswith((".yaml", ".yml"))
    assert parameters["workspace"] == "/data/unet3d-workspace"  # the compose workspace volume's mount point


def test_nightly_runs_one_at_a_time_on_the_gpu_pool():
    deployment = nightly()
    assert deployment["work_pool"]["name"] == POOL
    assert deployment["work_pool"]["work_queue_name"]
    limit = deployment["concurrency_limit"]
    assert (limit["limit"] if isinstance(limit, dict) else limit) == 1
    if isinstance(limit, dict) and limit.get("collision_strategy"):
        from prefect.client.schemas.objects import ConcurrencyLimitStrategy

        assert limit["collision_strategy"] in {s.value for s in ConcurrencyLimitStrategy}


def test_pull_step_sets_the_working_directory_the_image_uses():
    steps = load_yaml(PREFECT_YAML)["pull"]
    directories = [step["prefect.deployments.steps.set_working_directory"]["directory"]
                   for step in steps if "prefect.deployments.steps.set_working_directory" in step]
    assert directories == ["/opt/unet3d"]
    assert "WORKDIR /opt/unet3d" in (DEPLOY / "Dockerfile").read_text()


def test_entrypoint_defines_the_flow_and_accepts_the_parameters():
    path = pipeline_source()
    function = flow_function(path, "pipeline_flow")
    assert flow_decorator(function) is not None, "pipeline_flow is not decorated with @flow"
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    for required in ("config_path", "workspace", "refresh"):
        assert required in names, f"pipeline_flow has no parameter {required}"
    positional = args.posonlyargs + args.args
    without_default = {a.arg for a in positional[:len(positional) - len(args.defaults)]}
    without_default |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None}
    given = set(nightly()["parameters"])
    assert given <= set(names), f"parameters the flow does not take: {given - set(names)}"
    assert without_default <= given, f"required flow parameters missing: {without_default - given}"


# loading the file a second time registers its result serializers again, as the runner's own load does
@pytest.mark.filterwarnings("ignore:Type .* matches existing registered type:UserWarning")
def test_the_flow_a_worker_runs_can_be_sent_to_its_process():
    """A served deployment's runner loads flows/pipeline.py as a file and pickles the flow, with every global
    it uses, into the process that runs it; an unpicklable global (a ContextVar) crashed each nightly run
    before it started."""
    import cloudpickle
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(f"{REPO / 'flows' / 'pipeline.py'}:pipeline_flow")
    assert cloudpickle.loads(cloudpickle.dumps(flow)).name == "unet3d-pipeline"


def test_readme_runs_the_deployment_by_the_flows_name():
    function = flow_function(pipeline_source(), "pipeline_flow")
    decorator = flow_decorator(function)
    flow_name = function.name.replace("_", "-")  # Prefect's default flow name
    if isinstance(decorator, ast.Call):
        for keyword in decorator.keywords:
            if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                flow_name = keyword.value.value
    readme = (DEPLOY / "README.md").read_text()
    assert f"prefect deployment run {flow_name}/nightly" in readme
    for named in re.findall(r"deployment (?:run|inspect) ([\w.-]+)/nightly", readme):
        assert named == flow_name, f"README names flow {named!r}, the flow is called {flow_name!r}"


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml, .env.example, Dockerfile, scripts
# ---------------------------------------------------------------------------------------------------------
def test_compose_has_the_production_services():
    services = compose()["services"]
    assert SERVICES <= set(services)

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "healthcheck" in postgres and any("/var/lib/postgresql/data" in v for v in postgres["volumes"])

    server = services["prefect-server"]
    assert server["image"].startswith("prefecthq/prefect:") and "3-python3.11" in server["image"]
    assert " ".join(server["command"]).startswith("prefect server start --host 0.0.0.0")
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":4200") for p in server["ports"])

    worker = services["worker"]
    assert worker["build"]["context"] == ".." and worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert any(v.endswith(":/data/unet3d-workspace") for v in worker["volumes"])


def test_dask_services_share_the_image_and_scale():
    services = compose()["services"]
    worker_image = services["worker"]["image"]
    scheduler, dask_worker = services["dask-scheduler"], services["dask-worker"]
    assert scheduler["image"] == dask_worker["image"] == worker_image  # identical versions on both ends
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    command = dask_worker["command"]
    assert command[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert command[command.index("--nthreads") + 1] == "1" and "--memory-limit" in command
    # `--scale dask-worker=N` fails on a fixed container name or host port.
    assert "container_name" not in dask_worker and "ports" not in dask_worker
    assert dask_worker["volumes"] == services["worker"]["volumes"]  # same paths for the preprocessing I/O


def test_deploy_service_is_a_one_shot_profile():
    deploy = compose()["services"]["deploy"]
    assert deploy["profiles"] == ["deploy"] and deploy["restart"] == "no"
    command = " ".join(deploy["command"])
    assert "ensure-work-pool.sh" in command
    assert "prefect deploy --all" in command and "--prefect-file deploy/prefect.yaml" in command


def test_gpu_override_reserves_a_gpu_for_the_worker():
    devices = load_yaml(COMPOSE_GPU)["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_env_example_documents_every_compose_variable_and_holds_no_secret():
    used = set()
    for path in (COMPOSE, COMPOSE_GPU):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    documented = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                      if line and not line.startswith("#"))
    assert used <= set(documented), f"not in .env.example: {used - set(documented)}"
    assert documented["POSTGRES_PASSWORD"] == ""  # no usable default: compose refuses to start until one is set
    assert not (DEPLOY / ".env").exists() or ".env" in (REPO / ".gitignore").read_text(), \
        "deploy/.env exists and is not git-ignored"


def test_dockerfile_installs_the_project_as_a_non_root_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" torch' in text
    assert re.search(r"^RUN pip install \. ", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    command = re.search(r'^CMD \["([^"]+)"', text, re.M).group(1)
    assert command == "/opt/unet3d/deploy/start-worker.sh"


@pytest.mark.parametrize("script", ["ensure-work-pool.sh", "start-worker.sh"])
def test_worker_scripts_are_valid_shell(script):
    path = DEPLOY / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["sh", "-n", str(path)], check=True)
    text = path.read_text()
    if script == "ensure-work-pool.sh":
        assert "prefect work-pool create" in text and "--type process" in text
        assert "prefect work-pool set-concurrency-limit" in text


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no Compose binary: install Debian's `docker-compose` package (apt-get install docker-compose) "
                "or the Docker Compose v2 plugin to validate the compose files")


def run_compose_config(tmp_path: Path, files: list[Path], password: str | None,
                       profile: str | None = None) -> subprocess.CompletedProcess:
    # An empty env file keeps a developer's deploy/.env out of the check.
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("POSTGRES_", "PREFECT_", "UNET3D_", "DASK_", "COMPOSE_")) or k == "TZ")}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    args = [*compose_command(), "--env-file", str(empty_env)]
    for path in files:
        args += ["-f", str(path)]
    if profile:
        args += ["--profile", profile]
    return subprocess.run([*args, "config", "-q"], capture_output=True, encoding="utf-8", env=env, cwd=DEPLOY, timeout=60)


def test_compose_config_validates(tmp_path):
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        result = run_compose_config(tmp_path, files, password="test-only")
        assert result.returncode == 0, result.stderr
    with_deploy = run_compose_config(tmp_path, [COMPOSE], password="test-only", profile="deploy")
    assert with_deploy.returncode == 0, with_deploy.stderr


def test_compose_refuses_to_start_without_a_database_password(tmp_path):
    result = run_compose_config(tmp_path, [COMPOSE], password=None)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# deploy/dask
# ---------------------------------------------------------------------------------------------------------
def test_slurm_jobqueue_config_runs_single_threaded_workers():
    slurm = load_yaml(DEPLOY / "dask" / "slurm-jobqueue.yaml")["jobqueue"]["slurm"]
    assert slurm["cores"] == 1 and slurm["processes"] == 1
    assert re.fullmatch(r"\d+(GB|GiB)", slurm["memory"])
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", slurm["walltime"])
    readme = (DEPLOY / "dask" / "README.md").read_text()
    for needed in ("SLURMCluster(", "cluster.scale(8)", "cluster.scheduler_address", "dask_address"):
        assert needed in readme


def test_kubernetes_example_is_a_daskcluster_of_the_unet3d_image():
    cluster = load_yaml(DEPLOY / "dask" / "kubernetes-daskcluster.yaml")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert worker["image"] == scheduler["image"]
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/data/unet3d-workspace", "/data/datasets"} <= mounts
    name = cluster["metadata"]["name"]
    assert f"tcp://{name}-scheduler." in (DEPLOY / "dask" / "README.md").read_text()
