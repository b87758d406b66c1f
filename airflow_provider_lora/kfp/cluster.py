"""The cluster launch modes of train_model: a Kubeflow Trainer TrainJob (the default, as the seed) or one training Pod,
through the plain sync ``kubernetes`` client of the KFP environment (kubernetes<31), with the same manifests
(render_trainjob, render_pod) and the same reading of states and results (classify_trainjob, classify_pod,
find_result) as the Airflow operator.

Names are deterministic per task execution, so a retry of the task finds what its earlier try launched instead of
starting a second training. The launched job is deleted once the result is collected, or the failure read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.launchers import cluster
from airflow_provider_lora.core.launchers.pod import SUCCEEDED
from airflow_provider_lora.core.launchers.trainjob import installed_trainer_version
from airflow_provider_lora.core.limits import check_manifest
from airflow_provider_lora.core.render import (TRAINER_CONTAINER, PodOptions, SecretRef, TaskIdentity, TrainJobOptions,
                                               merge_under, render_plan_pod, render_pod, render_trainjob,
                                               trainer_api_shape)
from airflow_provider_lora.core.results import RunResult, load_run_result
from airflow_provider_lora.core.spec import SECRET_NAME_PARTS, LoRASpec
from airflow_provider_lora.kfp.runtime import ENV_DRY_RUN, ENV_PLAN_MEMORY, json_object_setting

ENV_SERVER = "KUBERNETES_SERVER_URL"
ENV_TOKEN = "KUBERNETES_AUTH_TOKEN"
ENV_CA = "KUBERNETES_CA_CERT"  # CA bundle file for KUBERNETES_SERVER_URL (default: the system's)
ENV_POD_OPTIONS = "LORA_KFP_POD_OPTIONS"
ENV_HF_TOKEN_SECRET = "LORA_KFP_HF_TOKEN_SECRET"
ENV_TRAINER_RUNTIME = "LORA_KFP_TRAINER_RUNTIME"  # ClusterTrainingRuntime name, or kind/name
ENV_TRAINER_API = "LORA_KFP_TRAINER_API_VERSION"  # v2.0 | v2.1 | v2.2 (default: read from the cluster)
ENV_POLL = "LORA_KFP_POLL_SECONDS"
ENV_STARTUP_TIMEOUT = "LORA_KFP_STARTUP_TIMEOUT"
ENV_TRAINING_IMAGE = "LORA_KFP_TRAINING_IMAGE"  # set by the component: LORA_KFP_BASE_IMAGE when it was compiled
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Task environment variables that never go to the launched job: the launcher's own settings and credentials.
NOT_FORWARDED = {ENV_SERVER, ENV_TOKEN, ENV_CA, ENV_POD_OPTIONS, ENV_HF_TOKEN_SECRET, ENV_TRAINER_RUNTIME,
                 ENV_TRAINER_API, ENV_POLL, ENV_STARTUP_TIMEOUT, ENV_TRAINING_IMAGE, "LORA_KFP_LAUNCHER",
                 "LORA_KFP_SPEC", ENV_DRY_RUN, ENV_PLAN_MEMORY}


# ---- the cluster -------------------------------------------------------------------------------------------------

def api_client(env: Mapping[str, str]) -> Any:
    """KUBERNETES_SERVER_URL + KUBERNETES_AUTH_TOKEN (as the seed; https only, certificates verified, against
    KUBERNETES_CA_CERT or the system's CAs), else the pod's in-cluster service account."""
    from kubernetes import client, config

    server, token = env.get(ENV_SERVER, "").strip(), env.get(ENV_TOKEN, "").strip()
    if server or token:
        if not (server and token):
            missing = ENV_TOKEN if server else ENV_SERVER
            raise ValueError(f"{ENV_SERVER} and {ENV_TOKEN} go together: {missing} is not set")
        if not server.startswith("https://"):
            raise ValueError(f"{ENV_SERVER}={server!r} is not valid: the API server must be reached over https:// "
                             "(the bearer token would otherwise travel in clear)")
        configuration = client.Configuration()
        configuration.host = server.rstrip("/")
        # kubernetes <36 reads the key "authorization", 36+ "BearerToken" (and its prefix only under that name).
        configuration.api_key = {"authorization": token, "BearerToken": token}
        configuration.api_key_prefix = {"authorization": "Bearer", "BearerToken": "Bearer"}
        configuration.verify_ssl = True
        if env.get(ENV_CA):
            configuration.ssl_ca_cert = env[ENV_CA]
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise RuntimeError(f"no Kubernetes API to launch the training job on: not running in a cluster ({exc}) and "
                           f"{ENV_SERVER}/{ENV_TOKEN} are not set") from None
    return client.ApiClient()


# ---- what the launched job gets from the task --------------------------------------------------------------------

@dataclass
class Launch:
    """Where and as whom the job runs, from LORA_KFP_POD_OPTIONS and the task's kubernetes_config."""

    options: PodOptions
    envs: dict[str, str] = field(default_factory=dict)  # the task's literal env: added to the spec's envs
    pod_env: list[dict[str, Any]] = field(default_factory=list)  # configMap/field references: a Pod only
    resources: dict[str, Any] = field(default_factory=dict)  # the task's resources under the spec's: a Pod only


def _namespace(options: dict[str, Any]) -> str:
    if options.get("namespace"):
        return options["namespace"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def launch_settings(env: Mapping[str, str], task_config: Any, pvc_path: str,
                    log: Callable[[str], None] = print) -> Launch:
    """LORA_KFP_POD_OPTIONS (PodOptions fields as JSON) plus what the task's kubernetes_config passes through:
    volumes and mounts, node selector, tolerations and affinity; env entries (secrets only as references: a literal
    value under a secret-looking name is refused); resources under the spec's training_resource_* values."""
    options = json_object_setting(env, ENV_POD_OPTIONS, "PodOptions fields",
                                  '{"namespace": "team-a", "pvc_claim_name": "workspace"}')
    unknown = sorted(set(options) - set(PodOptions.model_fields))
    if unknown:
        raise ValueError(f"{ENV_POD_OPTIONS} sets {', '.join(unknown)}: not PodOptions fields; accepted: "
                         f"{', '.join(PodOptions.model_fields)}")
    options["namespace"] = _namespace(options)
    if options.get("pvc_claim_name") and not options.get("pvc_mount_path"):
        options["pvc_mount_path"] = pvc_path  # the launched pods see the workspace where the task does
    secret_env = {k: SecretRef.parse(v, f"{ENV_POD_OPTIONS} secret_env[{k!r}]")
                  for k, v in (options.pop("secret_env", None) or {}).items()}
    if env.get(ENV_HF_TOKEN_SECRET):
        secret_env["HF_TOKEN"] = SecretRef.parse(env[ENV_HF_TOKEN_SECRET], ENV_HF_TOKEN_SECRET)

    envs: dict[str, str] = {}
    pod_env: list[dict[str, Any]] = []
    resources: dict[str, Any] = {}
    if task_config is not None:
        options["volumes"] = [*options.get("volumes", ()), *(task_config.volumes or [])]
        options["volume_mounts"] = [*options.get("volume_mounts", ()), *(task_config.volume_mounts or [])]
        options["tolerations"] = [*options.get("tolerations", ()), *(task_config.tolerations or [])]
        options["node_selector"] = {**(task_config.node_selector or {}), **options.get("node_selector", {})}
        if task_config.affinity and not options.get("affinity"):
            options["affinity"] = task_config.affinity
        for entry in task_config.env or []:
            name = entry.get("name", "")
            if name in NOT_FORWARDED:
                continue
            secret = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if "value" in entry:
                if SECRET_NAME_PARTS & set(name.upper().split("_")):
                    raise ValueError(
                        f"kubernetes_config env {name!r} carries a literal value and looks like a secret: it would be "
                        "written into the training job's manifest. Give it to the task from a Kubernetes Secret "
                        "(kfp.kubernetes.use_secret_as_env) so only the reference is passed on")
                envs[name] = entry["value"]
            elif secret:
                secret_env.setdefault(name, SecretRef(name=secret["name"], key=secret["key"]))
            else:
                pod_env.append(dict(entry))
        resources = dict(task_config.resources or {})
    if "HF_TOKEN" not in secret_env and env.get("HF_TOKEN"):
        log(f"[train_model] warning: HF_TOKEN is set in this task but is not passed to the training job (it would be "
            f"a literal in its manifest): set {ENV_HF_TOKEN_SECRET}=secret/key, or give HF_TOKEN to the task from a "
            "Secret so kubernetes_config passes the reference on")
    options.setdefault("image", env.get(ENV_TRAINING_IMAGE))
    if not options["image"]:
        raise ValueError(f"{ENV_POD_OPTIONS} has no image and {ENV_TRAINING_IMAGE} is not set (the component sets it "
                         f"to LORA_KFP_BASE_IMAGE): give the training image, such as {ENV_POD_OPTIONS}="
                         '{"image": "registry.example.com/team/lora-trainer:0.1.0"}')
    return Launch(PodOptions(**options, secret_env=secret_env), envs, pod_env, resources)


def _pod_options(launch: Launch) -> PodOptions:
    """A Pod takes the task's other env references and resources as a template under ours."""
    container: dict[str, Any] = {"name": TRAINER_CONTAINER}
    if launch.pod_env:
        container["env"] = launch.pod_env
    if launch.resources:
        container["resources"] = launch.resources
    if len(container) == 1:
        return launch.options
    template = merge_under(launch.options.pod_template or {}, {"spec": {"containers": [container]}})
    return launch.options.model_copy(update={"pod_template": template})


def _trainjob_options(env: Mapping[str, str], core: Any, log: Callable[[str], None]) -> TrainJobOptions:
    runtime = env.get(ENV_TRAINER_RUNTIME, "").strip()
    kind, _, name = runtime.rpartition("/") if "/" in runtime else ("", "", runtime)
    shape = env.get(ENV_TRAINER_API, "").strip()
    if not shape:
        version = installed_trainer_version(core)
        if version is None:
            raise RuntimeError("LORA_KFP_LAUNCHER=trainjob but the cluster has no readable Kubeflow Trainer version "
                               "(ConfigMap kubeflow-system/kubeflow-trainer-public): is Kubeflow Trainer installed? "
                               f"Set {ENV_TRAINER_API} (v2.0, v2.1 or v2.2) to skip the detection, or "
                               "LORA_KFP_LAUNCHER=pod")
        shape = trainer_api_shape(version)
        log(f"[train_model] Kubeflow Trainer {version} installed: rendering the TrainJob for the {shape} API")
    values = {"api_shape": shape} | ({"runtime_name": name} if name else {}) | ({"runtime_kind": kind} if kind else {})
    return TrainJobOptions(**values)


def train_on_cluster(spec: LoRASpec, launcher: str, launch: Launch, *, key: str, env: Mapping[str, str],
                     log: Callable[[str], None] = print) -> RunResult:
    """Launch ``spec`` as a pod or TrainJob (or reattach to the one this task execution already launched), follow
    its log, collect the published run, delete the job."""
    from kubernetes import client

    identity = _identity(key)
    core = client.CoreV1Api(api_client(env))
    poll, startup_timeout = _timing(env)
    try:  # a bad combination fails here, before anything launches
        if launcher == "pod":
            manifest = render_pod(spec, _pod_options(launch), identity)
        else:
            if launch.pod_env or launch.resources:
                log("[train_model] note: a TrainJob's pods come from its runtime: the task's "
                    f"{'env references ' + ', '.join(e['name'] for e in launch.pod_env) if launch.pod_env else ''}"
                    f"{' and ' if launch.pod_env and launch.resources else ''}"
                    f"{'resources' if launch.resources else ''} are not passed on (the spec's resources are)")
            manifest = render_trainjob(spec, launch.options, identity, _trainjob_options(env, core, log))
        check_manifest(manifest, spec)  # what the kernel or the API server would refuse, said before launching
    except ValueError as exc:
        raise ValueError(f"{exc}\n(KFP: the training job must see pvc_path: pass the workspace volume through "
                         f"kubernetes_config, or set {ENV_POD_OPTIONS}='{{\"pvc_claim_name\": \"<claim>\"}}', which "
                         "mounts it at pvc_path)" if "mounted volume" in str(exc) else str(exc)) from None
    job = cluster.for_manifest(core, manifest)

    def say(line: str) -> None:
        log(f"[train_model] {line}")

    cluster.create_or_reattach(job, say, identity.try_number)
    try:
        state, log_pod = cluster.follow(job, poll, startup_timeout, log)
        if state.phase != SUCCEEDED:
            raise RuntimeError(f"training {job} {state.phase}: {state.describe()}\n"
                               f"{job.failure_logs(log_pod)}")
        try:
            if log_pod and job.logged_result(log_pod) is None:
                say(f"warning: {job} succeeded without a result line in its log")
        except Exception as exc:  # the published run below is what counts
            say(f"warning: could not read the log of {log_pod}: {cluster.describe_api_error(exc)}")
        try:
            return load_run_result(spec.output_uri)
        except storage.IncompleteRunError as exc:
            raise RuntimeError(f"training {job} succeeded but its run cannot be read here: {exc}") from None
    finally:
        if job.delete():
            say(f"deleted {job}")


def plan_on_cluster(spec: LoRASpec, launch: Launch, *, key: str, env: Mapping[str, str], memory_gib: float | None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The dry run: the training's pod (whichever launcher would train) without a GPU, running the plan of
    ``spec``; the plan, or PlanRefused. Nothing is left running."""
    from kubernetes import client

    core = client.CoreV1Api(api_client(env))
    poll, startup_timeout = _timing(env)
    manifest = render_plan_pod(spec, _pod_options(launch), _identity(key), memory_gib)
    check_manifest(manifest, spec)
    return cluster.run_plan(cluster.for_manifest(core, manifest), poll, startup_timeout, log)


def _identity(key: str) -> TaskIdentity:
    """The task execution, as the labels and names of what it launches see it."""
    return TaskIdentity(dag_id="kfp", task_id="train_model", run_id=key, deployment="kfp")


def _timing(env: Mapping[str, str]) -> tuple[float, float]:
    """LORA_KFP_POLL_SECONDS and LORA_KFP_STARTUP_TIMEOUT (the operator's poll_interval and startup_timeout)."""
    values = []
    defaults = {ENV_POLL: cluster.DEFAULT_POLL_SECONDS, ENV_STARTUP_TIMEOUT: cluster.DEFAULT_STARTUP_TIMEOUT}
    for name, default in defaults.items():
        text = env.get(name, "").strip()
        try:
            seconds = float(text) if text else default
        except ValueError:
            seconds = text  # refused below, naming the variable
        values.append(cluster.check_seconds(name, seconds))
    return values[0], values[1]
