"""LoRATrainingOperator: one LoRA fine-tune as an Airflow task.

validate the spec -> render the pod -> create it, or reattach to the one this task instance already has ->
push its identity to XCom -> defer to LoRATrainingTrigger (or wait in the worker) -> collect the result from the
pod's log -> clean up. ``launcher="local"`` trains in a subprocess of the worker instead.

The spec's fields are keyword arguments with the spec's names and defaults (see docs/parameters.md); no parameter
is spelled out by hand here.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Sequence

from airflow_provider_lora.compat import AirflowException, AirflowFailException, BaseOperator, Context, conf
from airflow_provider_lora.core.launchers.pod import FAILED, classify_pod, find_result
from airflow_provider_lora.core.launchers.trainjob import (
    classify_trainjob, failed_nodes, installed_trainer_version, node_pod_selector,
)
from airflow_provider_lora.core.render import (
    LABEL_PREFIX, PodOptions, SecretRef, TaskIdentity, TrainJobOptions, render_pod, render_trainjob, trainer_api_shape,
)
from airflow_provider_lora.core.spec import LoRASpec, SpecError
from airflow_provider_lora.links import LoRAArtifactsLink, LossChartLink, push_loss_chart

SPEC_FIELDS = tuple(LoRASpec.model_fields)
LAUNCHERS = ("pod", "local", "trainjob")
ON_FINISH_ACTIONS = ("delete_pod", "delete_succeeded_pod", "keep_pod")
LAST_LOG_LINES = 30
RESULT_LOG_TAIL = 20  # lines read back to find the trainer's result line
XCOM_LAUNCHED = "launched"  # {"kind": "Pod" | "TrainJob", "name", "namespace"}


class LoRATrainingOperator(BaseOperator):
    """Fine-tune ``base_model`` on ``dataset`` with LoRA and publish the adapter, metrics and loss chart to
    ``output_uri``. Returns (XCom) ``{"summary", "history", "artifacts"}``.

    Besides every LoRASpec field (docs/parameters.md):

    :param launcher: ``pod`` (a Kubernetes pod running the training image), ``trainjob`` (a Kubeflow Trainer
        TrainJob: ``resource_num_workers`` nodes under torchrun), or ``local`` (a subprocess of the worker:
        laptops, CPU runs, tests).
    :param trainer_runtime: the TrainJob's runtime (default ``torch-distributed``); ``trainer_runtime_kind``:
        ``ClusterTrainingRuntime`` (default) or ``TrainingRuntime`` (namespaced).
    :param trainer_api_version: the Kubeflow Trainer generation to render the TrainJob for: ``v2.0``
        (podSpecOverrides), ``v2.1`` (podTemplateOverrides) or ``v2.2`` (runtimePatches, also later versions).
        None (default): read from the cluster's ``kubeflow-system/kubeflow-trainer-public`` ConfigMap.
    :param active_deadline_seconds: stop the training after this many seconds (a Pod's activeDeadlineSeconds;
        a TrainJob's needs Trainer v2.2+).
    :param kubernetes_conn_id: the cncf-kubernetes connection, as KubernetesPodOperator uses it.
    :param config_file, cluster_context, in_cluster: override the connection, as in KubernetesHook.
    :param namespace, image, image_pull_policy, image_pull_secrets, service_account_name, node_selector,
        tolerations, affinity, volumes, volume_mounts: the pod's settings, spelled as in Kubernetes.
    :param pvc_claim_name, pvc_mount_path: a PVC mounted as the workspace (default path /mnt/lora); put
        ``dataset``, ``output_uri`` and ``data_output_dir`` under the mount path. A path ``output_uri`` must be on
        a mounted volume (this PVC or one in ``volumes``), or the task fails before launching.
    :param pod_template: a pod manifest (dict, or a YAML/JSON file path) that our settings are merged over.
    :param hf_token_secret: ``"secret/key"`` holding a Hugging Face token, given to the pod as HF_TOKEN.
    :param secret_env: more environment variables from secrets: ``{"AWS_SECRET_ACCESS_KEY": "s3-creds/secret"}``.
    :param deployment: tells apart Airflow deployments sharing a namespace (default: ``[lora] deployment`` or
        "default"); part of the pod's name and labels.
    :param deferrable: free the worker slot while training (default: ``[operators] default_deferrable``).
    :param poll_interval: seconds between pod status checks.
    :param startup_timeout: seconds a pod may stay pending before the task fails with the pod's events.
    :param on_finish_action: ``delete_pod``, ``delete_succeeded_pod`` (keep failed pods to inspect) or
        ``keep_pod``; for a TrainJob the same applies to the TrainJob (its pods go with it).
    :param aws_conn_id: the Airflow AWS connection the worker reads S3 with (the completed-run check before
        launching, the loss chart after the run); needs apache-airflow-providers-amazon. None (default): boto3's
        default chain (environment, ~/.aws, instance role). The pod never gets these credentials: give it its own
        with ``secret_env`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    :param s3_endpoint_url: an S3-compatible endpoint (MinIO, Ceph, ...), e.g. ``http://minio.minio:9000``: used
        by the worker's S3 client (over the connection's ``endpoint_url``) and given to the trainer as
        AWS_ENDPOINT_URL. None (default): the connection's or boto3's own (AWS_ENDPOINT_URL).
    """

    template_fields: Sequence[str] = (*SPEC_FIELDS, "image", "namespace")
    ui_color = "#e8f0fe"
    operator_extra_links = (LoRAArtifactsLink(), LossChartLink())

    def __init__(
        self,
        *,
        launcher: str = "pod",
        kubernetes_conn_id: str | None = "kubernetes_default",
        config_file: str | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
        namespace: str = "default",
        image: str = PodOptions.model_fields["image"].default,
        image_pull_policy: str | None = None,
        image_pull_secrets: Sequence[str] = (),
        service_account_name: str | None = None,
        node_selector: dict[str, str] | None = None,
        tolerations: Sequence[dict[str, Any]] = (),
        affinity: dict[str, Any] | None = None,
        volumes: Sequence[dict[str, Any]] = (),
        volume_mounts: Sequence[dict[str, Any]] = (),
        pvc_claim_name: str | None = None,
        pvc_mount_path: str = PodOptions.model_fields["pvc_mount_path"].default,
        pod_template: dict[str, Any] | str | None = None,
        hf_token_secret: str | dict[str, str] | None = None,
        secret_env: dict[str, Any] | None = None,
        deployment: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 10.0,
        startup_timeout: float = 600.0,
        on_finish_action: str = "delete_succeeded_pod",
        aws_conn_id: str | None = None,
        s3_endpoint_url: str | None = None,
        trainer_runtime: str = TrainJobOptions.model_fields["runtime_name"].default,
        trainer_runtime_kind: str = TrainJobOptions.model_fields["runtime_kind"].default,
        trainer_api_version: str | None = None,
        active_deadline_seconds: int | None = None,
        **kwargs: Any,
    ) -> None:
        spec_values = {name: kwargs.pop(name) for name in SPEC_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        for name in SPEC_FIELDS:
            setattr(self, name, spec_values.get(name, LoRASpec.model_fields[name].default))
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher={launcher!r} is not valid: accepted: {', '.join(LAUNCHERS)}")
        for name, seconds in (("poll_interval", poll_interval), ("startup_timeout", startup_timeout)):
            if not (isinstance(seconds, (int, float)) and seconds > 0):
                raise ValueError(f"{name}={seconds!r} is not valid: give a number of seconds > 0")
        if on_finish_action not in ON_FINISH_ACTIONS:
            raise ValueError(f"on_finish_action={on_finish_action!r} is not valid: accepted: "
                             f"{', '.join(ON_FINISH_ACTIONS)}")
        self.launcher = launcher
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.namespace = namespace
        self.image = image
        self.image_pull_policy = image_pull_policy
        self.image_pull_secrets = tuple(image_pull_secrets)
        self.service_account_name = service_account_name
        self.node_selector = dict(node_selector or {})
        self.tolerations = tuple(tolerations)
        self.affinity = affinity
        self.volumes = tuple(volumes)
        self.volume_mounts = tuple(volume_mounts)
        self.pvc_claim_name = pvc_claim_name
        self.pvc_mount_path = pvc_mount_path
        self.pod_template = pod_template
        self.secret_env = {name: SecretRef.parse(v, f"secret_env[{name!r}]") for name, v in (secret_env or {}).items()}
        if hf_token_secret is not None:
            self.secret_env["HF_TOKEN"] = SecretRef.parse(hf_token_secret, "hf_token_secret")
        self.deployment = deployment or conf.get("lora", "deployment", fallback="default")
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.on_finish_action = on_finish_action
        if s3_endpoint_url is not None and not _is_http_url(s3_endpoint_url):
            raise ValueError(f"s3_endpoint_url={s3_endpoint_url!r} is not valid: give an http(s) URL such as "
                             "'http://minio.minio:9000'")
        self.aws_conn_id = aws_conn_id
        self.s3_endpoint_url = s3_endpoint_url
        self._s3_client: Any = None
        self.trainer_runtime = trainer_runtime
        self.trainer_runtime_kind = trainer_runtime_kind
        self.trainer_api_version = trainer_api_version
        if trainer_api_version is not None:
            TrainJobOptions(api_shape=trainer_api_version)  # a clear error at DAG parse
        self.active_deadline_seconds = active_deadline_seconds
        self._launched: tuple[str, str] | None = None  # (name, namespace) of the pod/TrainJob once created or found
        # Fail at DAG parse for values that are already final (templated ones are checked after rendering).
        self._spec(final=False)

    # ---- the spec ---------------------------------------------------------------------------------------------

    def _spec(self, final: bool = True) -> LoRASpec:
        values = {}
        for name in SPEC_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and "{{" in value and not final:
                continue  # checked once rendered
            if isinstance(value, str) and value == "None" and LoRASpec.model_fields[name].default is None:
                value = None  # a Jinja-rendered None
            values[name] = value
        try:
            return LoRASpec.parse(values)
        except SpecError as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None

    def _options(self) -> PodOptions:
        template = self.pod_template
        if isinstance(template, str):
            import yaml

            template = yaml.safe_load(Path(template).read_text())
        return PodOptions(
            namespace=self.namespace, image=self.image, image_pull_policy=self.image_pull_policy,
            image_pull_secrets=self.image_pull_secrets, service_account_name=self.service_account_name,
            node_selector=self.node_selector, tolerations=self.tolerations, affinity=self.affinity,
            volumes=self.volumes, volume_mounts=self.volume_mounts, pvc_claim_name=self.pvc_claim_name,
            pvc_mount_path=self.pvc_mount_path, secret_env=self.secret_env,
            pod_template=template, s3_endpoint_url=self.s3_endpoint_url,
            active_deadline_seconds=self.active_deadline_seconds,
        )

    def _trainjob_options(self, api: Any) -> TrainJobOptions:
        from airflow_provider_lora import kube

        shape = self.trainer_api_version
        if shape is None:
            version = installed_trainer_version(api)
            if version is None:
                raise AirflowFailException(
                    f"{self.task_id}: launcher='trainjob' but the cluster has no readable Kubeflow Trainer version "
                    "(ConfigMap kubeflow-system/kubeflow-trainer-public): is Kubeflow Trainer installed? Set "
                    "trainer_api_version ('v2.0', 'v2.1' or 'v2.2') to skip the detection")
            shape = trainer_api_shape(version)
            self.log.info("Kubeflow Trainer %s installed: rendering the TrainJob for the %s API", version, shape)
        return TrainJobOptions(runtime_name=self.trainer_runtime, runtime_kind=self.trainer_runtime_kind,
                               api_shape=shape)

    @property
    def _cluster(self):
        from airflow_provider_lora.kube import ClusterRef

        return ClusterRef(self.kubernetes_conn_id, self.config_file, self.cluster_context, self.in_cluster)

    def _s3(self) -> Any:
        """The worker's S3 client (made once): the Amazon provider's for ``aws_conn_id``, else boto3's default
        chain; ``s3_endpoint_url`` overrides the endpoint of either."""
        if self._s3_client is None:
            from airflow_provider_lora.core import storage

            if self.aws_conn_id is None:
                self._s3_client = storage.s3_client(self.s3_endpoint_url)
            else:
                try:
                    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
                except ImportError:
                    raise AirflowFailException(
                        f"aws_conn_id={self.aws_conn_id!r} needs apache-airflow-providers-amazon on the worker, "
                        "which is not installed: install it, or set aws_conn_id=None to use boto3's default "
                        "credential chain") from None
                hook = S3Hook(aws_conn_id=self.aws_conn_id, config={"retries": storage.RETRIES})
                self._s3_client = (hook.get_conn() if self.s3_endpoint_url is None else
                                   hook.get_session(region_name=hook.region_name).client(
                                       "s3", endpoint_url=self.s3_endpoint_url, config=hook.config,
                                       verify=hook.verify))
        return self._s3_client

    def _check_output_free(self, spec: LoRASpec) -> None:
        """Before launching: refuse an output location that already holds a completed run (unless
        ``overwrite_output``), as the trainer would, but without spending a pod on it. A path output is checked
        by the trainer alone: only a local run's paths are visible from the worker."""
        from airflow_provider_lora.core import storage

        if spec.overwrite_output or not (storage.is_s3(spec.output_uri) or self.launcher == "local"):
            return
        try:
            storage.check_output_available(spec.output_uri, False,
                                           client=self._s3() if storage.is_s3(spec.output_uri) else None)
        except storage.OutputExistsError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        except Exception as exc:  # credentials, network: botocore's errors share no base class with ClientError
            if self.aws_conn_id is not None:  # asked for worker access: it must work
                raise AirflowException(f"aws_conn_id={self.aws_conn_id!r}: could not read {spec.output_uri}: "
                                       f"{exc}") from exc
            self.log.warning("could not check %s from the worker (%s); the trainer checks it", spec.output_uri, exc)

    # ---- execution ----------------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        try:
            spec = self._spec()
        except ValueError as exc:  # bad input: a retry would fail the same way
            raise AirflowFailException(str(exc)) from None
        if self.aws_conn_id is not None:
            self._s3()  # a missing provider or connection fails here, before anything launches
        try_number = getattr(context.get("ti"), "try_number", 1) or 1
        if try_number > 1 and spec.checkpoint_at_epoch and spec.resume_from_checkpoint is None:
            # A retry continues from the last checkpoint an earlier try left with the output (docs/reliability.md)
            # instead of from step 0; with none there, it starts at step 0.
            spec = spec.model_copy(update={"resume_from_checkpoint": "latest"})
            self.log.info("try %s: resuming from the last checkpoint of an earlier try, if there is one", try_number)
        if self.launcher == "local":
            return self._execute_local(spec)
        return self._execute_on_cluster(spec, context)

    def _execute_local(self, spec: LoRASpec) -> dict[str, Any]:
        from airflow_provider_lora.core.launchers.local import TrainingFailed, run_local

        self._check_output_free(spec)
        env = {"AWS_ENDPOINT_URL": self.s3_endpoint_url} if self.s3_endpoint_url else None
        try:
            result = run_local(spec, on_line=self.log.info, env=env,
                               client=self._s3() if spec.output_uri.startswith("s3://") else None)
        except TrainingFailed as exc:
            raise AirflowException(str(exc)) from None
        return self._return_value(result.to_xcom())

    def _execute_on_cluster(self, spec: LoRASpec, context: Context) -> Any:
        from airflow_provider_lora import kube

        ti = context["ti"]
        identity = TaskIdentity(dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
                                map_index=getattr(ti, "map_index", -1), try_number=ti.try_number,
                                deployment=self.deployment)
        api = kube.sync_core_api(self._cluster)
        try:
            if self.launcher == "trainjob":
                manifest = render_trainjob(spec, self._options(), identity, self._trainjob_options(api))
            else:
                manifest = render_pod(spec, self._options(), identity)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        self._launched = (name, namespace)
        self._create_or_reattach(api, manifest)
        ti.xcom_push(key=XCOM_LAUNCHED, value={"kind": manifest["kind"], "name": name, "namespace": namespace})
        if self.deferrable:
            self.defer(trigger=self._trigger(name, namespace), method_name="execute_complete")
        return self.execute_complete(context, self._wait_in_worker(name, namespace))

    def _trigger(self, name: str, namespace: str) -> Any:
        from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

        return LoRATrainingTrigger(
            name=name, namespace=namespace, launcher=self.launcher, kubernetes_conn_id=self.kubernetes_conn_id,
            config_file=self.config_file, cluster_context=self.cluster_context, in_cluster=self.in_cluster,
            poll_interval=self.poll_interval, startup_timeout=self.startup_timeout,
        )

    # One small protocol over the two cluster launchers: read, state, create, delete.

    @property
    def _kind(self) -> str:
        return "pod" if self.launcher == "pod" else "TrainJob"

    def _read(self, api: Any, name: str, namespace: str) -> dict[str, Any] | None:
        from airflow_provider_lora import kube

        return (kube.read_pod if self.launcher == "pod" else kube.read_trainjob)(api, name, namespace)

    def _state(self, api: Any, launched: dict[str, Any]) -> Any:
        from airflow_provider_lora import kube

        if self.launcher == "pod":
            return classify_pod(launched)
        name, namespace = launched["metadata"]["name"], launched["metadata"]["namespace"]
        return classify_trainjob(launched, kube.list_pods(api, namespace, node_pod_selector(name)))

    def _delete(self, api: Any, name: str, namespace: str) -> bool:
        from airflow_provider_lora import kube

        return (kube.delete_pod if self.launcher == "pod" else kube.delete_trainjob)(api, name, namespace)

    def _create(self, api: Any, manifest: dict[str, Any]) -> bool:
        """Create; False when an object of that name already exists (made meanwhile by another try)."""
        from kubernetes.client.exceptions import ApiException

        from airflow_provider_lora import kube

        if self.launcher == "pod":
            return kube.create_pod(api, manifest)
        try:
            kube.create_trainjob(api, manifest)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in (400, 403, 404, 422):  # refused as asked: a retry would be refused the same way
                raise AirflowFailException(f"{self.task_id}: the cluster refused the TrainJob: "
                                           f"{kube.describe_api_error(exc)}") from None
            raise

    def _create_or_reattach(self, api: Any, manifest: dict[str, Any]) -> None:
        """Create the pod or TrainJob, unless this task instance already has one: a running or succeeded one (say,
        from a try whose worker died) is reattached, never duplicated; a failed one is replaced."""
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        existing = self._read(api, name, namespace)
        if existing is not None:
            state = self._state(api, existing)
            made_by = existing["metadata"].get("labels", {}).get(LABEL_PREFIX + "try_number", "?")
            if state.phase != FAILED:
                self.log.info("reattaching to %s %s/%s (%s), created by try %s", self._kind, namespace, name,
                              state.phase, made_by)
                return
            self.log.info("%s %s/%s from try %s failed (%s): replacing it", self._kind, namespace, name, made_by,
                          state.describe())
            self._delete(api, name, namespace)
            self._wait_until_gone(api, name, namespace)
        self._check_output_free(self._spec())
        if not self._create(api, manifest):
            self.log.info("%s %s/%s was created meanwhile (by another try of this task): reattaching", self._kind,
                          namespace, name)
            return
        self.log.info("created %s %s/%s", self._kind, namespace, name)

    def _wait_until_gone(self, api: Any, name: str, namespace: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self._read(api, name, namespace) is not None:
            if time.monotonic() > deadline:
                raise AirflowException(f"{self._kind} {namespace}/{name} was not deleted within {timeout:.0f}s")
            time.sleep(1)

    def _wait_in_worker(self, name: str, namespace: str) -> dict[str, Any]:
        """deferrable=False: run the trigger's own loop here, in the worker (same events, same log following)."""
        import asyncio

        from airflow_provider_lora.kube import close_shared_clients

        async def first_event() -> dict[str, Any]:
            try:
                async for event in self._trigger(name, namespace).run():
                    return event.payload
                raise AirflowException("the trigger ended without an event")
            finally:
                await close_shared_clients()

        return asyncio.run(first_event())

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger (or the worker's wait): collect the result, clean up, or fail with the
        reason and the last log lines."""
        from airflow_provider_lora import kube

        name, namespace, log_pod = event["name"], event["namespace"], event.get("log_pod")
        self._launched = (name, namespace)
        api = kube.sync_core_api(self._cluster)
        succeeded = event["status"] == "success"
        try:
            if succeeded:
                log_tail = kube.read_log_tail(api, log_pod, namespace, RESULT_LOG_TAIL) if log_pod else ""
                result = find_result(log_tail) or (self._termination_result(api, log_pod, namespace)
                                                   if log_pod else None)
                if result is None:
                    raise AirflowException(f"{self._kind} {namespace}/{name} succeeded but neither the log nor the "
                                           f"termination message of {log_pod} holds the result; last "
                                           f"lines:\n{log_tail}")
                return self._return_value(result)
            raise AirflowException(f"training {self._kind} {namespace}/{name} {event['status']}: "
                                   f"{event['description']}\n{self._failure_logs(api, namespace, log_pod)}")
        finally:
            self._clean_up(api, name, namespace, succeeded, stuck=event["status"] == "stuck")

    def _failure_logs(self, api: Any, namespace: str, log_pod: str | None) -> str:
        """The last log lines of the pod, or of every failed node of a TrainJob (rank 0 if none failed): the
        error is often on another rank than 0."""
        from airflow_provider_lora import kube

        pods = [log_pod] if log_pod else []
        if self.launcher == "trainjob" and self._launched:
            try:
                nodes = kube.list_pods(api, namespace, node_pod_selector(self._launched[0]))
                pods = [pod_name for _, pod_name, _ in failed_nodes(nodes)] or pods
            except Exception as exc:  # the logs are a courtesy on a path that already fails
                return f"(could not list the node pods: {exc})"
        return "\n".join(f"last {LAST_LOG_LINES} log lines of {pod}:\n{_safe_tail(api, pod, namespace)}"
                         for pod in pods) or "(no pod ever started)"

    def _termination_result(self, api: Any, name: str, namespace: str) -> dict[str, Any] | None:
        """The headline result the trainer wrote to its termination message (4 KiB: no loss history), for when
        the log no longer has the result line (rotated, or the node's log was lost)."""
        from airflow_provider_lora import kube

        pod = kube.read_pod(api, name, namespace)
        message = classify_pod(pod).termination_message if pod else ""
        try:
            result = json.loads(message)
        except ValueError:
            return None
        self.log.warning("the pod log has no result line; using the termination message (no loss history)")
        return {"summary": result.get("summary", {}), "history": [], "artifacts": result.get("artifacts", {})}

    def _return_value(self, result: dict[str, Any]) -> dict[str, Any]:
        summary = result.get("summary", {})
        self.log.info("training finished: final loss %s (min %s) after %s steps; artifacts: %s",
                      summary.get("final_loss"), summary.get("min_loss"), summary.get("global_step"),
                      json.dumps(result.get("artifacts", {})))
        push_loss_chart(result, self.log, s3=self._s3)  # XCom loss_chart_html, for the Loss chart tab
        return result

    def _clean_up(self, api: Any, name: str, namespace: str, succeeded: bool, stuck: bool = False) -> None:
        from airflow_provider_lora import kube

        if stuck:  # a run that never started is deleted whatever on_finish_action says: it could start later
            self._delete(api, name, namespace)
            self.log.info("deleted %s %s/%s: it never started, and must not start later unwatched", self._kind,
                          namespace, name)
        elif self.on_finish_action == "delete_pod" or (self.on_finish_action == "delete_succeeded_pod" and succeeded):
            self._delete(api, name, namespace)
            self.log.info("deleted %s %s/%s (on_finish_action=%s)", self._kind, namespace, name,
                          self.on_finish_action)

    def on_kill(self) -> None:
        if self._launched is None:
            return
        from airflow_provider_lora import kube

        name, namespace = self._launched
        if self._delete(kube.sync_core_api(self._cluster), name, namespace):
            self.log.info("deleted %s %s/%s (task killed)", self._kind, namespace, name)


def _safe_tail(api: Any, name: str, namespace: str) -> str:
    from airflow_provider_lora import kube

    try:
        text = kube.read_log_tail(api, name, namespace, LAST_LOG_LINES)
    except Exception as exc:  # the log is a courtesy on a path that already fails
        return f"(could not read the log: {kube.describe_api_error(exc)})"
    return "\n".join(line.partition(" ")[2] for line in text.splitlines())


def _is_http_url(text: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _signature() -> inspect.Signature:
    """The operator's signature with every spec field as a keyword argument, for help() and IDEs."""
    own = inspect.signature(LoRATrainingOperator.__init__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                 annotation=field.annotation) for name, field in LoRASpec.model_fields.items()]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return own.replace(parameters=params)


LoRATrainingOperator.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
