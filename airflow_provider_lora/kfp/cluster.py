"""Pod launch mode of train_model: one training pod per task execution, through the plain sync ``kubernetes`` client
of the KFP environment, with the same manifest (render_pod) and the same reading of pod states and results
(classify_pod, find_result) as the Airflow operator.

The pod's name is deterministic per task execution, so a retry of the task finds the pod its earlier try made
instead of starting a second training. The pod is deleted once the result is collected, or the failure read.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.launchers.pod import (FAILED, PENDING, SUCCEEDED, LogCursor, classify_pod, find_result,
                                                      new_log_lines, seconds_since)
from airflow_provider_lora.core.render import TRAINER_CONTAINER, PodOptions, SecretRef, TaskIdentity, render_pod
from airflow_provider_lora.core.results import RunResult, load_run_result
from airflow_provider_lora.core.spec import SECRET_NAME_PARTS, LoRASpec

ENV_SERVER = "KUBERNETES_SERVER_URL"
ENV_TOKEN = "KUBERNETES_AUTH_TOKEN"
ENV_CA = "KUBERNETES_CA_CERT"  # CA bundle file for KUBERNETES_SERVER_URL (default: the system's)
ENV_POD_OPTIONS = "LORA_KFP_POD_OPTIONS"
ENV_HF_TOKEN_SECRET = "LORA_KFP_HF_TOKEN_SECRET"
ENV_POLL = "LORA_KFP_POLL_SECONDS"
ENV_STARTUP_TIMEOUT = "LORA_KFP_STARTUP_TIMEOUT"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Task environment variables that never go to the launched pod: the launcher's own settings and credentials.
NOT_FORWARDED = {ENV_SERVER, ENV_TOKEN, ENV_CA, ENV_POD_OPTIONS, ENV_HF_TOKEN_SECRET, ENV_POLL, ENV_STARTUP_TIMEOUT,
                 "LORA_KFP_LAUNCHER", "LORA_KFP_SPEC"}
LAST_LINES = 30
RESULT_TAIL = 20
LOG_READ_TIMEOUT = 120  # seconds without a log byte before the stream is re-opened (the pod's state is checked)


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
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        configuration.verify_ssl = True
        if env.get(ENV_CA):
            configuration.ssl_ca_cert = env[ENV_CA]
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise RuntimeError(f"no Kubernetes API to launch the training pod on: not running in a cluster ({exc}) and "
                           f"{ENV_SERVER}/{ENV_TOKEN} are not set") from None
    return client.ApiClient()


def _namespace(options: dict[str, Any]) -> str:
    if options.get("namespace"):
        return options["namespace"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


# ---- what the pod gets -------------------------------------------------------------------------------------------

def _secret_ref(value: Any, name: str) -> SecretRef:
    if isinstance(value, dict):
        return SecretRef(**value)
    if isinstance(value, str) and value.count("/") == 1 and all(value.split("/")):
        secret, key = value.split("/")
        return SecretRef(name=secret, key=key)
    raise ValueError(f"{name}={value!r} is not valid: give 'secret-name/key' or {{'name': ..., 'key': ...}}")


def _task_env(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's passed-through env entries for the pod: references as they are; a literal value under a
    secret-looking name is refused (it would be written into the pod manifest)."""
    out = []
    for entry in entries:
        name = entry.get("name", "")
        if name in NOT_FORWARDED:
            continue
        if "value" in entry and SECRET_NAME_PARTS & set(name.upper().split("_")):
            raise ValueError(f"kubernetes_config env {name!r} carries a literal value and looks like a secret: it "
                             "would be written into the training pod's manifest. Set it on the task from a Kubernetes "
                             "Secret (kfp.kubernetes.use_secret_as_env) so only the reference is passed on")
        out.append(dict(entry))
    return out


def pod_options(env: Mapping[str, str], task_config: Any, pvc_path: str,
                log: Callable[[str], None] = print) -> PodOptions:
    """LORA_KFP_POD_OPTIONS (PodOptions fields as JSON) plus what the task's kubernetes_config passes through:
    volumes and mounts, node selector, tolerations and affinity as is; env entries and extra resources as a pod
    template under ours (the spec's training_resource_* values win for cpu, memory and GPUs)."""
    text = env.get(ENV_POD_OPTIONS, "").strip()
    try:
        base = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"{ENV_POD_OPTIONS} is not valid JSON ({exc}); expected an object of PodOptions fields such "
                         'as {"namespace": "team-a", "pvc_claim_name": "workspace"}') from None
    if not isinstance(base, dict):
        raise ValueError(f"{ENV_POD_OPTIONS} must be a JSON object of PodOptions fields, got {type(base).__name__}")
    unknown = sorted(set(base) - set(PodOptions.model_fields))
    if unknown:
        raise ValueError(f"{ENV_POD_OPTIONS} sets {', '.join(unknown)}: not PodOptions fields; accepted: "
                         f"{', '.join(PodOptions.model_fields)}")
    options = dict(base)
    options["namespace"] = _namespace(options)
    if options.get("pvc_claim_name") and not options.get("pvc_mount_path"):
        options["pvc_mount_path"] = pvc_path  # the launched pod sees the workspace where the task does
    secret_env = {k: _secret_ref(v, f"{ENV_POD_OPTIONS} secret_env[{k!r}]")
                  for k, v in (options.pop("secret_env", None) or {}).items()}
    if env.get(ENV_HF_TOKEN_SECRET):
        secret_env["HF_TOKEN"] = _secret_ref(env[ENV_HF_TOKEN_SECRET], ENV_HF_TOKEN_SECRET)

    container: dict[str, Any] = {"name": TRAINER_CONTAINER}
    if task_config is not None:
        options["volumes"] = [*options.get("volumes", ()), *(task_config.volumes or [])]
        options["volume_mounts"] = [*options.get("volume_mounts", ()), *(task_config.volume_mounts or [])]
        options["tolerations"] = [*options.get("tolerations", ()), *(task_config.tolerations or [])]
        options["node_selector"] = {**(task_config.node_selector or {}), **options.get("node_selector", {})}
        if task_config.affinity and not options.get("affinity"):
            options["affinity"] = task_config.affinity
        task_env = _task_env(task_config.env or [])
        if task_env:
            container["env"] = task_env
        if task_config.resources:
            container["resources"] = task_config.resources
    forwarded = {e["name"] for e in container.get("env", [])}
    if "HF_TOKEN" not in secret_env and "HF_TOKEN" not in forwarded and env.get("HF_TOKEN"):
        log(f"[train_model] warning: HF_TOKEN is set in this task but is not passed to the training pod (it would be "
            f"a literal in its manifest): set {ENV_HF_TOKEN_SECRET}=secret/key, or give HF_TOKEN to the task from a "
            "Secret so kubernetes_config passes the reference on")
    if len(container) > 1:
        template = {"spec": {"containers": [container]}}
        options["pod_template"] = _merge(options.get("pod_template") or {}, template)
    return PodOptions(**options, secret_env=secret_env)


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    from airflow_provider_lora.core.render import merge_under

    return merge_under(under, over)


# ---- launch, follow, collect, clean up ---------------------------------------------------------------------------

def train_in_pod(spec: LoRASpec, *, key: str, task_config: Any, env: Mapping[str, str],
                 log: Callable[[str], None] = print, pvc_path: str = "") -> RunResult:
    from kubernetes import client

    options = pod_options(env, task_config, pvc_path, log)
    identity = TaskIdentity(dag_id="kfp", task_id="train_model", run_id=key, deployment="kfp")
    try:
        manifest = render_pod(spec, options, identity)  # a bad combination fails here, before anything launches
    except ValueError as exc:
        raise ValueError(f"{exc}\n(KFP: the training pod must see pvc_path: pass the workspace volume through "
                         f"kubernetes_config, or set {ENV_POD_OPTIONS}='{{\"pvc_claim_name\": \"<claim>\"}}', "
                         "which mounts it at pvc_path)") from None
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    api = client.CoreV1Api(api_client(env))
    poll = float(env.get(ENV_POLL) or 10)
    startup_timeout = float(env.get(ENV_STARTUP_TIMEOUT) or 600)
    _create_or_reattach(api, manifest, log)
    try:
        state = _follow(api, name, namespace, poll, startup_timeout, log)
        if state.phase != SUCCEEDED:
            raise RuntimeError(f"training pod {namespace}/{name} {state.phase}: {state.describe()}\n"
                               f"last {LAST_LINES} log lines:\n{_tail(api, name, namespace, LAST_LINES)}")
        if find_result(_tail(api, name, namespace, RESULT_TAIL)) is None:
            log(f"[train_model] warning: pod {namespace}/{name} succeeded without a result line in its log")
        try:
            return load_run_result(spec.output_uri)
        except storage.IncompleteRunError as exc:
            raise RuntimeError(f"training pod {namespace}/{name} succeeded but its run cannot be read here: {exc}") \
                from None
    finally:
        if _delete(api, name, namespace):
            log(f"[train_model] deleted pod {namespace}/{name}")


def _read(api: Any, name: str, namespace: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return json.loads(api.read_namespaced_pod(name, namespace, _preload_content=False).data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _delete(api: Any, name: str, namespace: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_pod(name, namespace, grace_period_seconds=30)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def _create_or_reattach(api: Any, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    """Create the pod, unless this task execution already has one (a retry): a running or succeeded pod is
    reattached, a failed one replaced."""
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    existing = _read(api, name, namespace)
    if existing is not None:
        state = classify_pod(existing)
        if state.phase != FAILED:
            log(f"[train_model] reattaching to pod {namespace}/{name} ({state.phase})")
            return
        log(f"[train_model] pod {namespace}/{name} from an earlier try failed ({state.describe()}): replacing it")
        _delete(api, name, namespace)
        deadline = time.monotonic() + 120
        while _read(api, name, namespace) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pod {namespace}/{name} was not deleted within 120s")
            time.sleep(1)
    api.create_namespaced_pod(namespace, manifest)
    log(f"[train_model] created pod {namespace}/{name}")


def _follow(api: Any, name: str, namespace: str, poll: float, startup_timeout: float,
            log: Callable[[str], None]) -> Any:
    """Wait for the pod to start, stream its log (re-opened after a drop, without repeating lines), and return its
    terminal state."""
    started = time.monotonic()
    cursor = LogCursor()
    while True:
        pod = _read(api, name, namespace)
        if pod is None:
            raise RuntimeError(f"training pod {namespace}/{name} disappeared (deleted outside this task)")
        state = classify_pod(pod)
        if state.phase == PENDING:
            if state.stuck:
                raise RuntimeError(f"training pod {namespace}/{name} cannot start: {state.describe()}")
            if time.monotonic() - started > startup_timeout:
                raise RuntimeError(f"training pod {namespace}/{name} still pending after {startup_timeout:.0f}s: "
                                   f"{state.describe()}")
            time.sleep(poll)
            continue
        cursor = _stream_log(api, name, namespace, cursor, log)
        if state.terminal:
            return state
        # The stream ended while the pod ran (a dropped connection, or the container just exited): look again.
        time.sleep(poll)


def _stream_log(api: Any, name: str, namespace: str, cursor: LogCursor, log: Callable[[str], None]) -> LogCursor:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    since = int(seconds_since(cursor.timestamp)) + 2 if cursor.timestamp else None
    try:
        response = api.read_namespaced_pod_log(name, namespace, container=TRAINER_CONTAINER, follow=True,
                                               timestamps=True, since_seconds=since, _preload_content=False,
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
        log(f"[train_model] log stream of {namespace}/{name} interrupted ({type(exc).__name__}); re-reading state")
    return cursor


def _tail(api: Any, name: str, namespace: str, lines: int) -> str:
    try:
        text = api.read_namespaced_pod_log(name, namespace, container=TRAINER_CONTAINER, tail_lines=lines,
                                           _preload_content=False).data.decode("utf-8", "replace")
    except Exception as exc:  # the log is a courtesy on a path that may already fail
        return f"(could not read the log: {exc})"
    return text

