"""The cluster launch modes of train_model: a Kubeflow Trainer TrainJob (the default, as the seed) or one training Pod,
through the plain sync ``kubernetes`` client of the KFP environment (kubernetes<31), with the same manifests
(render_trainjob, render_pod) and the same reading of states and results (classify_trainjob, classify_pod,
find_result) as the Airflow operator.

Names are deterministic per task execution, so a retry of the task finds what its earlier try launched instead of
starting a second training. The launched job is deleted once the result is collected, or the failure read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.launchers.pod import (FAILED, PENDING, SUCCEEDED, LogCursor, PodState, classify_pod,
                                                      find_result, new_log_lines, seconds_since)
from airflow_provider_lora.core.launchers.trainjob import (classify_trainjob, failed_nodes, installed_trainer_version,
                                                           node_pod_selector, rank0_pod)
from airflow_provider_lora.core.limits import check_manifest
from airflow_provider_lora.core.render import (TRAINER_CONTAINER, TRAINJOB_GROUP, TRAINJOB_NODE_JOB, TRAINJOB_PLURAL,
                                               TRAINJOB_VERSION, PodOptions, SecretRef, TaskIdentity,
                                               TrainJobOptions, merge_under, render_pod, render_trainjob,
                                               trainer_api_shape)
from airflow_provider_lora.core.results import RunResult, load_run_result
from airflow_provider_lora.core.spec import SECRET_NAME_PARTS, LoRASpec

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
                 "LORA_KFP_SPEC"}
LAST_LINES = 30
RESULT_TAIL = 200  # other ranks may print many lines after the result line
LOG_READ_TIMEOUT = 120  # seconds without a log byte before the stream is re-opened (the job's state is checked)


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
    text = env.get(ENV_POD_OPTIONS, "").strip()
    try:
        options = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"{ENV_POD_OPTIONS} is not valid JSON ({exc}); expected an object of PodOptions fields such "
                         'as {"namespace": "team-a", "pvc_claim_name": "workspace"}') from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_POD_OPTIONS} must be a JSON object of PodOptions fields, got {type(options).__name__}")
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


# ---- one launched job, pod or TrainJob, behind the same few calls ------------------------------------------------

class _Job:
    """The launched object: create, read its state, find the pod whose log to follow, delete."""

    kind = "pod"
    container = TRAINER_CONTAINER

    def __init__(self, core: Any, manifest: dict[str, Any]):
        self.core, self.manifest = core, manifest
        self.name, self.namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]

    def read(self) -> dict[str, Any] | None:
        return _get(lambda: self.core.read_namespaced_pod(self.name, self.namespace, _preload_content=False))

    def create(self) -> None:
        self.core.create_namespaced_pod(self.namespace, self.manifest)

    def state(self, obj: dict[str, Any]) -> PodState:
        return classify_pod(obj)

    def log_pod(self, obj: dict[str, Any]) -> str | None:
        return self.name

    def failed_logs(self) -> str:
        return _tail(self.core, self.name, self.namespace, self.container, LAST_LINES)

    def delete(self) -> bool:
        return _gone_ok(lambda: self.core.delete_namespaced_pod(self.name, self.namespace, grace_period_seconds=30))


class _TrainJob(_Job):
    kind = "TrainJob"
    container = TRAINJOB_NODE_JOB

    def __init__(self, core: Any, manifest: dict[str, Any]):
        from kubernetes import client

        super().__init__(core, manifest)
        self.custom = client.CustomObjectsApi(core.api_client)
        self.args = (TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL)

    def read(self) -> dict[str, Any] | None:
        return _get(lambda: self.custom.get_namespaced_custom_object(*self.args, self.name, _preload_content=False))

    def create(self) -> None:
        # Strict: a field the installed Trainer does not know is an error, not silently dropped.
        self.custom.create_namespaced_custom_object(*self.args, self.manifest, field_validation="Strict")

    def pods(self) -> list[dict[str, Any]]:
        response = self.core.list_namespaced_pod(self.namespace, label_selector=node_pod_selector(self.name),
                                                 _preload_content=False)
        return json.loads(response.data)["items"]

    def state(self, obj: dict[str, Any]) -> PodState:
        return classify_trainjob(obj, self.pods())

    def log_pod(self, obj: dict[str, Any]) -> str | None:
        pod = rank0_pod(self.pods())  # node rank 0 prints the result line
        return pod["metadata"]["name"] if pod else None

    def failed_logs(self) -> str:
        nodes = failed_nodes(self.pods()) or []
        if not nodes:
            pod = self.log_pod({})
            return _tail(self.core, pod, self.namespace, self.container, LAST_LINES) if pod else "(no node pods)"
        return "\n".join(f"--- node {rank} ({name}): {state.describe()}\n"
                         f"{_tail(self.core, name, self.namespace, self.container, LAST_LINES)}"
                         for rank, name, state in nodes)

    def delete(self) -> bool:
        return _gone_ok(lambda: self.custom.delete_namespaced_custom_object(
            *self.args, self.name, propagation_policy="Foreground"))


def _get(call: Callable[[], Any]) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return json.loads(call().data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _gone_ok(call: Callable[[], Any]) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def train_on_cluster(spec: LoRASpec, launcher: str, launch: Launch, *, key: str, env: Mapping[str, str],
                     log: Callable[[str], None] = print) -> RunResult:
    """Launch ``spec`` as a pod or TrainJob, follow its log, collect the published run, delete the job."""
    from kubernetes import client

    identity = TaskIdentity(dag_id="kfp", task_id="train_model", run_id=key, deployment="kfp")
    core = client.CoreV1Api(api_client(env))
    try:  # a bad combination fails here, before anything launches
        if launcher == "pod":
            job = _Job(core, render_pod(spec, _pod_options(launch), identity))
        else:
            if launch.pod_env or launch.resources:
                log("[train_model] note: a TrainJob's pods come from its runtime: the task's "
                    f"{'env references ' + ', '.join(e['name'] for e in launch.pod_env) if launch.pod_env else ''}"
                    f"{' and ' if launch.pod_env and launch.resources else ''}"
                    f"{'resources' if launch.resources else ''} are not passed on (the spec's resources are)")
            job = _TrainJob(core, render_trainjob(spec, launch.options, identity, _trainjob_options(env, core, log)))
        check_manifest(job.manifest, spec)  # what the kernel or the API server would refuse, said before launching
    except ValueError as exc:
        raise ValueError(f"{exc}\n(KFP: the training job must see pvc_path: pass the workspace volume through "
                         f"kubernetes_config, or set {ENV_POD_OPTIONS}='{{\"pvc_claim_name\": \"<claim>\"}}', which "
                         "mounts it at pvc_path)" if "mounted volume" in str(exc) else str(exc)) from None
    poll = float(env.get(ENV_POLL) or 10)
    startup_timeout = float(env.get(ENV_STARTUP_TIMEOUT) or 600)
    _create_or_reattach(job, log)
    try:
        state = _follow(job, poll, startup_timeout, log)
        if state.phase != SUCCEEDED:
            raise RuntimeError(f"training {job.kind} {job.namespace}/{job.name} {state.phase}: {state.describe()}\n"
                               f"last log lines:\n{job.failed_logs()}")
        pod = job.log_pod({})
        if pod and find_result(_tail(core, pod, job.namespace, job.container, RESULT_TAIL)) is None:
            log(f"[train_model] warning: {job.kind} {job.namespace}/{job.name} succeeded without a result line in "
                "its log")
        try:
            return load_run_result(spec.output_uri)
        except storage.IncompleteRunError as exc:
            raise RuntimeError(f"training {job.kind} {job.namespace}/{job.name} succeeded but its run cannot be "
                               f"read here: {exc}") from None
    finally:
        if job.delete():
            log(f"[train_model] deleted {job.kind} {job.namespace}/{job.name}")


def _create_or_reattach(job: _Job, log: Callable[[str], None]) -> None:
    """Create the job, unless this task execution already has one (a retry): a running or succeeded one is
    reattached, a failed one replaced."""
    existing = job.read()
    if existing is not None:
        state = job.state(existing)
        if state.phase != FAILED:
            log(f"[train_model] reattaching to {job.kind} {job.namespace}/{job.name} ({state.phase})")
            return
        log(f"[train_model] {job.kind} {job.namespace}/{job.name} from an earlier try failed ({state.describe()}): "
            "replacing it")
        job.delete()
        deadline = time.monotonic() + 120
        while job.read() is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{job.kind} {job.namespace}/{job.name} was not deleted within 120s")
            time.sleep(1)
    job.create()
    log(f"[train_model] created {job.kind} {job.namespace}/{job.name}")


def _follow(job: _Job, poll: float, startup_timeout: float, log: Callable[[str], None]) -> PodState:
    """Wait for the job to start, stream its (rank 0) log, re-opened after a drop without repeating lines, and
    return its terminal state."""
    started = time.monotonic()
    cursor, followed = LogCursor(), None
    while True:
        obj = job.read()
        if obj is None:
            raise RuntimeError(f"training {job.kind} {job.namespace}/{job.name} disappeared (deleted outside this "
                               "task)")
        state = job.state(obj)
        if state.phase == PENDING:
            if state.stuck:
                raise RuntimeError(f"training {job.kind} {job.namespace}/{job.name} cannot start: {state.describe()}")
            if time.monotonic() - started > startup_timeout:
                raise RuntimeError(f"training {job.kind} {job.namespace}/{job.name} still pending after "
                                   f"{startup_timeout:.0f}s: {state.describe()}")
            time.sleep(poll)
            continue
        pod = job.log_pod(obj)
        if pod is not None:
            if pod != followed:  # a restarted rank-0 pod logs from its own start
                cursor, followed = LogCursor(), pod
            cursor = _stream_log(job.core, pod, job.namespace, job.container, cursor, log)
        if state.terminal:
            return state
        time.sleep(poll)  # the stream ended while the job ran (a dropped connection, or it just ended): look again


def _stream_log(core: Any, pod: str, namespace: str, container: str, cursor: LogCursor,
                log: Callable[[str], None]) -> LogCursor:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    since = int(seconds_since(cursor.timestamp)) + 2 if cursor.timestamp else None
    try:
        response = core.read_namespaced_pod_log(pod, namespace, container=container, follow=True, timestamps=True,
                                                since_seconds=since, _preload_content=False,
                                                _request_timeout=(30, LOG_READ_TIMEOUT))
        try:
            for raw in response:
                new = new_log_lines(raw.decode("utf-8", "replace"), cursor)
                cursor = new.cursor
                for line in new.lines:
                    log(line)
        finally:
            response.release_conn()
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        if cursor.timestamp:  # before the first line, the container may simply not be ready to log yet
            log(f"[train_model] log stream of {namespace}/{pod} interrupted ({type(exc).__name__}); re-reading "
                "state")
    return cursor


def _tail(core: Any, pod: str, namespace: str, container: str, lines: int) -> str:
    try:
        return core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines,
                                            _preload_content=False).data.decode("utf-8", "replace")
    except Exception as exc:  # the log is a courtesy on a path that may already fail
        return f"(could not read the log: {exc})"
