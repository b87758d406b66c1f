"""LoRATrainingOperator: one LoRA fine-tune as an Airflow task.

validate the spec -> render the pod -> create it, or reattach to the one this task instance already has ->
push its identity to XCom -> defer to LoRATrainingTrigger (or wait in the worker) -> collect the result from the
pod's log -> clean up. ``launcher="local"`` trains in a subprocess of the worker instead.

The spec's fields are keyword arguments with the spec's names and defaults (see docs/parameters.md); no parameter
is spelled out by hand here.
"""

from __future__ import annotations

import datetime
import inspect
import json
import time
from pathlib import Path
from typing import Any, Sequence

from airflow_provider_lora.compat import AirflowException, AirflowFailException, BaseOperator, Context, conf
from airflow_provider_lora.core import oom
from airflow_provider_lora.core.contract import OOM_ADJUSTMENTS_KEY, OOM_EXIT_CODE, OOM_SETTINGS_ENV
from airflow_provider_lora.core.launchers import cluster
from airflow_provider_lora.core.launchers.local import LOCAL_LAUNCHER
from airflow_provider_lora.core.launchers.pod import fails_again
from airflow_provider_lora.core.launchers.trainjob import installed_trainer_version
from airflow_provider_lora.core.limits import check_manifest
from airflow_provider_lora.core.render import (
    IMAGE_REFERENCE, PodOptions, SecretRef, TaskIdentity, TrainJobOptions, render_plan_pod, render_pod,
    render_trainjob, trainer_api_shape,
)
from airflow_provider_lora.core.spec import LoRASpec, SpecError
from airflow_provider_lora.links import LoRAArtifactsLink, LossChartLink, push_loss_chart

SPEC_FIELDS = tuple(LoRASpec.model_fields)
# PodOptions fields taken as keyword arguments of the same name and default, as the spec's are; image (with its
# configuration fallback), secret_env (secret references parsed after rendering) and pod_template (a dict or a file)
# are the operator's own arguments.
POD_FIELDS = tuple(name for name in PodOptions.model_fields if name not in ("image", "secret_env", "pod_template"))
LAUNCHERS = (*cluster.CLUSTER_LAUNCHERS, LOCAL_LAUNCHER)
ON_FINISH_ACTIONS = ("delete_pod", "delete_succeeded_pod", "keep_pod")
# Fields a run cannot do without: a template that renders a missing value gives the string 'None'.
REQUIRED_FIELDS = ("base_model", "dataset", "output_uri")
# defer(timeout=) past the trigger's own deadline: a backstop for a trigger that cannot fire its timeout event.
DEFER_TIMEOUT_PADDING = datetime.timedelta(minutes=5)
XCOM_LAUNCHED = "launched"  # {"kind": "Pod" | "TrainJob", "name", "namespace"}
# The figures an adapter's asset event carries (besides its adapter, run and base_model): enough for a downstream
# DAG (evaluate, register, deploy) to decide without reading the run.
ADAPTER_EVENT_FIGURES = ("final_loss", "min_loss", "base_eval_loss", "final_eval_loss", "min_eval_loss", "global_step",
                         "epochs")
XCOM_PLAN = "plan"  # a dry run's preflight plan (lora-train --plan's JSON), with the manifest the training would create


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
    :param kubernetes_conn_id: the cncf-kubernetes connection, as KubernetesPodOperator uses it.
    :param config_file, cluster_context, in_cluster: override the connection, as in KubernetesHook.
    :param image: the training image (built from trainer/Dockerfile and pushed where the cluster pulls from), for
        ``launcher="pod"`` and ``"trainjob"``; default: ``[lora] image`` of the Airflow configuration. Required with
        those launchers: this project publishes no image.
    :param pod_template: a pod manifest (dict, or a YAML/JSON file path) that our settings are merged over.
    :param hf_token_secret: ``"secret/key"`` holding a Hugging Face token, given to the pod as HF_TOKEN.
    :param secret_env: more environment variables from secrets: ``{"AWS_SECRET_ACCESS_KEY": "s3-creds/secret"}``.
    :param deployment: tells apart Airflow deployments sharing a namespace (default: ``[lora] deployment`` or
        "default"); part of the pod's name and labels.
    :param deferrable: free the worker slot while training (default: ``[operators] default_deferrable``).
    :param poll_interval: the longest time between two looks at the pod's state (the triggerer's shared watch
        shows a change at once; without list/watch rights, or waiting in the worker, the state is read this often).
    :param log_interval: seconds between reads of the training's log into the task log (default: 30, at least
        ``poll_interval``); the end of the log is read at once when the run ends.
    :param startup_timeout: seconds a pod may stay pending before the task fails with the pod's events.
    :param on_finish_action: ``delete_pod``, ``delete_succeeded_pod`` (keep failed pods to inspect) or
        ``keep_pod``; for a TrainJob the same applies to the TrainJob (its pods go with it).
    :param dry_run: run the preflight plan instead of the training (docs/concepts.md, "The preflight plan"): with
        ``pod`` or ``trainjob``, in one pod of the training's image, service account, secrets and volumes without a
        GPU request, deleted when done, so a bad image, Secret, dataset or model fails in seconds on a CPU node;
        with ``local``, here, where its throughput is measured too. Returns ``{"dry_run": True, "plan": ...}`` and
        pushes the plan as XCom ``plan`` (with the manifest the training would create, secrets as references); a
        run that cannot fit fails, saying what would.
    :param plan_memory_gib: the accelerator memory per process (GiB) the plan compares its estimate with, such as
        80 for an H100 80GB: the plan pod has no GPU to ask.
    :param asset_alias: the name of an AssetAlias (a DatasetAlias on Airflow 2.11) added to the task's outlets: on
        success the task emits an asset event for its adapter's location (``s3://...`` or ``file://...``) with the
        run's figures as its extra (adapter, run, base_model, final and best losses, steps), so a DAG scheduled on
        ``AssetAlias(name)`` runs for each new adapter (dags/lora_adapter_ready.py).
    :param aws_conn_id: the Airflow AWS connection the worker reads S3 with (the completed-run check before
        launching, the loss chart after the run); needs apache-airflow-providers-amazon. None (default): boto3's
        default chain (environment, ~/.aws, instance role). The pod never gets these credentials: give it its own
        with ``secret_env`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

    Every PodOptions field (the pod's settings, spelled as in Kubernetes: ``namespace``, ``node_selector``,
    ``tolerations``, ``pvc_claim_name``, ``shm_size``, ...; docs/operator.md lists them) is a keyword argument too.
    ``s3_endpoint_url`` also serves the worker's own S3 client (over the connection's ``endpoint_url``).
    """

    # Every spec field, and every pod option users fill from params, Variables or connections; secret_env is kept
    # as given and parsed into secret references after rendering.
    template_fields: Sequence[str] = (
        *SPEC_FIELDS, *POD_FIELDS, "image", "kubernetes_conn_id", "config_file", "cluster_context", "secret_env",
        "hf_token_secret", "aws_conn_id", "trainer_runtime", "dry_run", "plan_memory_gib",
    )
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
        image: str | None = None,
        pod_template: dict[str, Any] | str | None = None,
        hf_token_secret: str | dict[str, str] | None = None,
        secret_env: dict[str, Any] | None = None,
        deployment: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = cluster.DEFAULT_POLL_SECONDS,
        log_interval: float | None = None,
        startup_timeout: float = cluster.DEFAULT_STARTUP_TIMEOUT,
        on_finish_action: str = "delete_succeeded_pod",
        aws_conn_id: str | None = None,
        trainer_runtime: str = TrainJobOptions.model_fields["runtime_name"].default,
        trainer_runtime_kind: str = TrainJobOptions.model_fields["runtime_kind"].default,
        trainer_api_version: str | None = None,
        dry_run: bool | str = False,
        plan_memory_gib: float | str | None = None,
        asset_alias: str | None = None,
        **kwargs: Any,
    ) -> None:
        spec_values = {name: kwargs.pop(name) for name in SPEC_FIELDS if name in kwargs}
        pod_values = {name: kwargs.pop(name) for name in POD_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        for name in SPEC_FIELDS:
            setattr(self, name, spec_values.get(name, LoRASpec.model_fields[name].default))
        for name in POD_FIELDS:
            setattr(self, name, pod_values.get(name, PodOptions.model_fields[name].get_default(
                call_default_factory=True)))
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher={launcher!r} is not valid: accepted: {', '.join(LAUNCHERS)}")
        cluster.check_seconds("poll_interval", poll_interval)
        cluster.check_seconds("startup_timeout", startup_timeout)
        if log_interval is not None:
            cluster.check_seconds("log_interval", log_interval)
        image = image or conf.get("lora", "image", fallback=None) or None
        if launcher != "local":
            _check_image(image, launcher)
        if on_finish_action not in ON_FINISH_ACTIONS:
            raise ValueError(f"on_finish_action={on_finish_action!r} is not valid: accepted: "
                             f"{', '.join(ON_FINISH_ACTIONS)}")
        self.launcher = launcher
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.image = image
        self.pod_template = pod_template
        self.secret_env = dict(secret_env or {})
        self.hf_token_secret = hf_token_secret
        self.deployment = deployment or conf.get("lora", "deployment", fallback="default")
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.log_interval = log_interval
        self.startup_timeout = startup_timeout
        self.on_finish_action = on_finish_action
        if isinstance(self.s3_endpoint_url, str) and "{{" not in self.s3_endpoint_url:
            _check_s3_endpoint(self.s3_endpoint_url)
        self.aws_conn_id = aws_conn_id
        self._s3_client: Any = None
        self.trainer_runtime = trainer_runtime
        self.trainer_runtime_kind = trainer_runtime_kind
        self.trainer_api_version = trainer_api_version
        if trainer_api_version is not None:
            TrainJobOptions(api_shape=trainer_api_version)  # a clear error at DAG parse
        self.dry_run = dry_run
        self.plan_memory_gib = plan_memory_gib
        self.asset_alias = asset_alias
        if asset_alias:
            from airflow_provider_lora.compat import AssetAlias

            self.outlets = [*self.outlets, AssetAlias(asset_alias)]
        if "{{" not in repr((dry_run, plan_memory_gib)):
            self._dry_run_settings()  # a clear error at DAG parse
        self._launched: tuple[str, str] | None = None  # (name, namespace) of the pod/TrainJob once created or found
        self._result: dict[str, Any] | None = None  # the return value, for the OpenLineage complete event
        # Fail at DAG parse for values that are already final (templated ones are checked after rendering).
        self._spec(final=False)
        if "{{" not in repr((self.secret_env, self.hf_token_secret)):
            self._secret_refs()

    # ---- the spec ---------------------------------------------------------------------------------------------

    def _spec(self, final: bool = True) -> LoRASpec:
        values = {}
        for name in SPEC_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and "{{" in value and not final:
                continue  # checked once rendered
            if isinstance(value, str) and value == "None" and LoRASpec.model_fields[name].default is None:
                value = None  # a Jinja-rendered None
            elif value == "None" and name in REQUIRED_FIELDS:
                raise ValueError(f"{self.task_id}: {name}='None' is not valid: a template rendered to None (a "
                                 f"missing dag_run.conf or params key?): {name} needs a real value")
            values[name] = value
        try:
            return LoRASpec.parse(values)
        except SpecError as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None

    def _dry_run_settings(self) -> tuple[bool, float | None]:
        """(dry_run, plan_memory_gib) as rendered: a template gives strings such as "True" or "80"."""
        dry_run, memory = self.dry_run, self.plan_memory_gib
        if isinstance(dry_run, str) and dry_run.strip().lower() in ("true", "false"):
            dry_run = dry_run.strip().lower() == "true"
        if not isinstance(dry_run, bool):
            raise ValueError(f"{self.task_id}: dry_run={self.dry_run!r} is not valid: give True or False")
        if isinstance(memory, str):
            try:
                memory = None if memory.strip() in ("", "None") else float(memory)
            except ValueError:
                pass
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
            raise ValueError(f"{self.task_id}: plan_memory_gib={self.plan_memory_gib!r} is not valid: give the "
                             "accelerator memory per process in GiB, such as 80, or None")
        return dry_run, None if memory is None else float(memory)

    def _secret_refs(self) -> dict[str, SecretRef]:
        """secret_env (``"secret/key"`` or ``{"name", "key"}`` per variable) plus HF_TOKEN from hf_token_secret,
        as secret references; a clear error naming the parameter otherwise."""
        refs = {name: SecretRef.parse(value, f"secret_env[{name!r}]") for name, value in self.secret_env.items()}
        if self.hf_token_secret:
            refs["HF_TOKEN"] = SecretRef.parse(self.hf_token_secret, "hf_token_secret")
        return refs

    def _options(self) -> PodOptions:
        if self.s3_endpoint_url is not None:
            _check_s3_endpoint(self.s3_endpoint_url)
        template = self.pod_template
        if isinstance(template, str):
            import yaml

            template = yaml.safe_load(Path(template).read_text())
        return PodOptions(image=self.image, secret_env=self._secret_refs(), pod_template=template,
                          **{name: getattr(self, name) for name in POD_FIELDS})

    def _trainjob_options(self, api: Any) -> TrainJobOptions:
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
    def _cluster_ref(self):
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

    def _check_output_free(self, spec: LoRASpec, task: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Before launching: refuse an output location that already holds a completed run (unless
        ``overwrite_output``), as the trainer would, but without spending a pod on it; unless that run is this
        task instance's own (same spec, same task: an earlier try published it and then failed, say, while
        collecting), which is returned instead. A path output is checked by the trainer alone: only a local run's
        paths are visible from the worker."""
        from airflow_provider_lora.core import storage

        if spec.overwrite_output or not (storage.is_s3(spec.output_uri) or self.launcher == "local"):
            return None
        try:
            storage.check_output_available(spec.output_uri, False,
                                           client=self._s3() if storage.is_s3(spec.output_uri) else None)
        except storage.OutputExistsError as exc:
            own = self._own_published_run(spec, task) if task is not None else None
            if own is not None:
                self.log.info("%s already holds this task's own run (same spec and task instance: an earlier try "
                              "published it); returning it instead of training again", spec.output_uri)
                return own
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        except Exception as exc:  # credentials, network: botocore's errors share no base class with ClientError
            if self.aws_conn_id is not None:  # asked for worker access: it must work
                raise AirflowException(f"aws_conn_id={self.aws_conn_id!r}: could not read {spec.output_uri}: "
                                       f"{exc}") from exc
            self.log.warning("could not check %s from the worker (%s); the trainer checks it", spec.output_uri, exc)
        return None

    def _own_published_run(self, spec: LoRASpec, task: dict[str, Any]) -> dict[str, Any] | None:
        from airflow_provider_lora.core import storage
        from airflow_provider_lora.core.results import is_own_run, load_run_result

        try:
            run = load_run_result(spec.output_uri, client=self._s3() if storage.is_s3(spec.output_uri) else None)
        except Exception as exc:  # unreadable: not recognisably ours, so the usual refusal stands
            self.log.warning("could not read the run at %s: %s", spec.output_uri, exc)
            return None
        return run.to_xcom() if is_own_run(run.summary, spec, task) else None

    def _published_result(self, spec: LoRASpec) -> dict[str, Any] | None:
        """The run the training published at ``output_uri``, when the worker can read it (S3 through its own
        client; a path only where the worker sees it, as with the local launcher or a shared mount)."""
        from airflow_provider_lora.core import storage
        from airflow_provider_lora.core.results import load_run_result

        s3 = storage.is_s3(spec.output_uri)
        if not spec.output_uri or not s3 and not Path(spec.output_uri, storage.COMPLETE_MARKER).exists():
            return None
        try:
            return load_run_result(spec.output_uri, client=self._s3() if s3 else None).to_xcom()
        except Exception as exc:  # missing marker, credentials, network: the next source may still have it
            self.log.warning("could not read the published run at %s: %s", spec.output_uri, exc)
            return None

    # ---- execution ----------------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        try:
            spec = self._spec()
        except ValueError as exc:  # bad input: a retry would fail the same way
            raise AirflowFailException(str(exc)) from None
        if self.aws_conn_id is not None:
            self._s3()  # a missing provider or connection fails here, before anything launches
        try:
            dry_run, plan_memory_gib = self._dry_run_settings()
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        if dry_run:
            return self._execute_dry_run(spec, context, plan_memory_gib)
        try_number = getattr(context.get("ti"), "try_number", 1) or 1
        if try_number > 1 and spec.checkpoint_at_epoch and spec.resume_from_checkpoint is None:
            # A retry continues from the last checkpoint an earlier try left with the output (docs/reliability.md)
            # instead of from step 0; with none there, it starts at step 0.
            spec = spec.model_copy(update={"resume_from_checkpoint": "latest"})
            self.log.info("try %s: resuming from the last checkpoint of an earlier try, if there is one", try_number)
        if self.launcher == "local":
            return self._execute_local(spec, context)
        return self._execute_on_cluster(spec, context)

    def _local_env(self, task: dict[str, Any] | None) -> dict[str, str]:
        """What the local trainer gets besides the spec's envs: the S3 endpoint and the launching task."""
        from airflow_provider_lora.core.contract import TASK_ENV

        env = {"AWS_ENDPOINT_URL": self.s3_endpoint_url} if self.s3_endpoint_url else {}
        if task is not None:
            env[TASK_ENV] = json.dumps(task, sort_keys=True)
        return env

    def _execute_local(self, spec: LoRASpec, context: Context) -> dict[str, Any]:
        from airflow_provider_lora.core.launchers.local import TrainingFailed, run_local

        task = _task_of(context.get("ti"), self.deployment)
        own = self._check_output_free(spec, task)
        if own is not None:
            return self._return_value(own, context)
        try:
            result = run_local(spec, on_line=self.log.info, env=self._local_env(task),
                               client=self._s3() if spec.output_uri.startswith("s3://") else None)
        except TrainingFailed as exc:
            raise AirflowException(str(exc)) from None
        return self._return_value(result.to_xcom(), context)

    def _identity(self, ti: Any) -> TaskIdentity:
        return TaskIdentity(dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
                            map_index=getattr(ti, "map_index", -1), try_number=ti.try_number,
                            deployment=self.deployment)

    def _manifest(self, spec: LoRASpec, identity: TaskIdentity, task: dict[str, Any] | None,
                  api: Any) -> dict[str, Any]:
        """The Pod or TrainJob this task's training runs as (ValueError for a bad combination)."""
        if self.launcher == "trainjob":
            manifest = render_trainjob(spec, self._options(), identity, self._trainjob_options(api))
        else:
            manifest = render_pod(spec, self._options(), identity)
        _add_task_env(manifest, task)
        return manifest

    def _execute_dry_run(self, spec: LoRASpec, context: Context, memory_gib: float | None) -> dict[str, Any]:
        """The preflight plan where the training would run (see the dry_run argument)."""
        from airflow_provider_lora.core.launchers.local import TrainingFailed, plan_local
        from airflow_provider_lora.core.launchers.pod import PlanRefused

        ti = context.get("ti")
        task = _task_of(ti, self.deployment)
        try:
            if self.launcher == LOCAL_LAUNCHER:
                plan = plan_local(spec, on_line=self.log.info, env=self._local_env(task), memory_gib=memory_gib)
            else:
                plan = self._plan_on_cluster(spec, ti, task, memory_gib)
        except PlanRefused as exc:
            if exc.plan is not None and ti is not None:
                ti.xcom_push(key=XCOM_PLAN, value=exc.plan)
            raise AirflowFailException(f"{self.task_id}: dry run: the training would not run as asked: {exc}") \
                from None
        except (TrainingFailed, RuntimeError) as exc:  # the plan pod could not start, or the plan failed
            raise AirflowException(f"{self.task_id}: dry run failed: {exc}") from None
        if ti is not None:
            ti.xcom_push(key=XCOM_PLAN, value=plan)
        memory = plan["memory"]
        self.log.info("dry run: nothing was trained; estimated peak %.2f GiB per process of %.2f GiB (%s)",
                      memory["required_bytes"] / 2 ** 30, memory["available_bytes"] / 2 ** 30,
                      memory["available_source"])
        return {"dry_run": True, "plan": plan}

    def _plan_on_cluster(self, spec: LoRASpec, ti: Any, task: dict[str, Any] | None,
                         memory_gib: float | None) -> dict[str, Any]:
        from airflow_provider_lora import kube

        identity = self._identity(ti)
        api = kube.sync_core_api(self._cluster_ref)
        try:
            training = self._manifest(spec, identity, task, api)
            check_manifest(training, spec)
            manifest = render_plan_pod(spec, self._options(), identity, memory_gib)
            check_manifest(manifest, spec)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        try:  # run_plan deletes the plan pod however it ends, a kill of the task included
            plan = cluster.run_plan(cluster.for_manifest(api, manifest), self.poll_interval, self.startup_timeout,
                                    self.log.info)
        except cluster.LaunchRefused as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        return {**plan, "manifests": [training]}

    def _execute_on_cluster(self, spec: LoRASpec, context: Context) -> Any:
        from airflow_provider_lora import kube

        ti = context["ti"]
        identity = self._identity(ti)
        task = _task_of(ti, self.deployment)
        api = kube.sync_core_api(self._cluster_ref)
        try:
            manifest = self._manifest(spec, identity, task, api)
            self._adjust_after_out_of_memory(api, manifest, spec, identity.try_number)
            check_manifest(manifest, spec)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        self._launched = (name, namespace)
        job = cluster.for_manifest(api, manifest)
        try:
            own = cluster.create_or_reattach(job, self.log.info, identity.try_number,
                                             before_create=lambda: self._check_output_free(spec, task))
        except cluster.LaunchRefused as exc:  # a retry would be refused the same way
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        if own is not None:
            self._launched = None
            return self._return_value(own, context)
        ti.xcom_push(key=XCOM_LAUNCHED, value={"kind": manifest["kind"], "name": name, "namespace": namespace})
        deadline = self._deadline(ti)
        if self.deferrable:
            # The trigger fires a timeout event at the deadline; the deferral's own timeout is only a backstop
            # (when it ends the deferral, the task fails without deleting the run).
            timeout = (None if deadline is None else
                       datetime.timedelta(seconds=max(0.0, deadline - time.time())) + DEFER_TIMEOUT_PADDING)
            job.mark_deferred(identity.try_number)
            self.defer(trigger=self._trigger(name, namespace, deadline), method_name="execute_complete",
                       timeout=timeout)
        return self.execute_complete(context, self._wait_in_worker(name, namespace, deadline))

    def _adjust_after_out_of_memory(self, api: Any, manifest: dict[str, Any], spec: LoRASpec,
                                    try_number: int) -> None:
        """A retry whose previous try ran out of memory (OOMKilled: the kernel's SIGKILL, which the trainer cannot
        catch) runs with half that try's micro-batch, the same effective batch and gradient checkpointing on
        (core/oom.py), read from the run that try left under the same name; it resumes from that try's checkpoint
        as every retry does. The trainer gets the settings in OOM_SETTINGS_ENV and records them in summary.json."""
        if try_number <= 1:
            return
        job = cluster.for_manifest(api, manifest)
        previous = job.read()
        if previous is None:
            self.log.warning(
                "try %s: %s of the previous try is gone (on_finish_action=%r%s), so whether it ran out of memory "
                "cannot be read: this try runs with the spec's micro-batch, not a halved one", try_number, job,
                self.on_finish_action, ", which deletes failed runs too" if self.on_finish_action == "delete_pod"
                else "; it was deleted")
            return
        state, _ = job.observe(previous)
        try:
            settings = oom.retry_settings(previous, state, spec, try_number)
        except oom.OutOfMemoryAtMicroBatch1 as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        if settings is None:
            return
        if oom.was_out_of_memory(state):
            self.log.warning("try %s: %s", try_number, oom.describe(settings["adjustments"][-1]))
        else:
            self.log.info("try %s keeps the earlier tries' out-of-memory settings: micro-batch %s, gradient "
                          "checkpointing on", try_number, settings["micro_batch"])
        _set_trainer_env(manifest, OOM_SETTINGS_ENV, json.dumps(settings))

    def _deadline(self, ti: Any) -> float | None:
        """Epoch seconds when this try's execution_timeout runs out (its start + execution_timeout): Airflow does
        not enforce execution_timeout while a task is deferred, so the trigger does."""
        if not self.execution_timeout:
            return None
        started = getattr(ti, "start_date", None)
        start = started.timestamp() if isinstance(started, datetime.datetime) else time.time()
        return start + self.execution_timeout.total_seconds()

    def _trigger(self, name: str, namespace: str, deadline: float | None = None, watch: bool = True) -> Any:
        from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

        return LoRATrainingTrigger(
            name=name, namespace=namespace, launcher=self.launcher, kubernetes_conn_id=self.kubernetes_conn_id,
            config_file=self.config_file, cluster_context=self.cluster_context, in_cluster=self.in_cluster,
            poll_interval=self.poll_interval, startup_timeout=self.startup_timeout, deadline=deadline,
            log_interval=self.log_interval, watch=watch,
        )

    def _job(self, api: Any, name: str, namespace: str) -> cluster.LaunchedPod:
        return cluster.launched(api, self.launcher, name, namespace)

    def _wait_in_worker(self, name: str, namespace: str, deadline: float | None = None) -> dict[str, Any]:
        """deferrable=False: run the trigger's own loop here, in the worker (same events, same log following)."""
        import asyncio

        from airflow_provider_lora.kube import close_shared_clients

        async def first_event() -> dict[str, Any]:
            try:
                # One training followed from here: a shared watch (a list and a watch) would cost more than reads.
                async for event in self._trigger(name, namespace, deadline, watch=False).run():
                    return event.payload
                raise AirflowException("the trigger ended without an event")
            finally:
                await close_shared_clients()

        return asyncio.run(first_event())

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger (or the worker's wait): collect the result, clean up, or fail with the
        reason and the last log lines."""
        from airflow_provider_lora import kube

        name, namespace = event["name"], event["namespace"]
        self._launched = (name, namespace)
        job = self._job(kube.sync_core_api(self._cluster_ref), name, namespace)
        status = event["status"]
        succeeded = status == "success"
        try:
            if succeeded:
                return self._return_value(self._collect(job, event), context)
            message = (f"training {job} {status}: {event['description']}\n"
                       f"{job.failure_logs(event.get('log_pod'), deleted=event.get('reason') == 'Deleted')}")
            if status == "timeout":
                raise _task_timeout(message)
            if fails_again(event.get("reason"), event.get("description") or ""):
                # A new pod from the same manifest fails the same way: spend no retry on it.
                raise AirflowFailException(message + "\n(not retried: a new pod would fail the same way)")
            if event.get("exit_code") == OOM_EXIT_CODE:
                raise AirflowFailException(message + "\n(not retried: out of memory at micro-batch 1)")
            raise AirflowException(message)
        finally:
            # A run that never started could start later, and one past its deadline is still running: both are
            # deleted whatever on_finish_action says.
            self._clean_up(job, succeeded, stop=status in ("stuck", "timeout"))

    def _collect(self, job: cluster.LaunchedPod, event: dict[str, Any]) -> dict[str, Any]:
        """The result of a succeeded run, from the first source that has it: the trigger's event (the result line
        it saw in the log), the log's tail, the run published at output_uri, the termination message. The pod
        may be gone by now (garbage-collected, a drained node, another worker of this try deleted it)."""
        from airflow_provider_lora.core import storage
        from airflow_provider_lora.core.results import bounded_result

        log_pod = event.get("log_pod")
        spec = self._spec()
        sources = [("the trigger's event", lambda: event.get("result"))]
        if log_pod:
            sources.append((f"the log of {log_pod}", lambda: job.logged_result(log_pod)))
        sources.append((f"the published run at {spec.output_uri}", lambda: self._published_result(spec)))
        if log_pod:
            sources.append((f"the termination message of {log_pod}", lambda: job.termination_result(log_pod)))
        for source, read in sources:
            try:
                result = bounded_result(read())
            except Exception as exc:  # gone (404) or unreadable: the next source may still have the result
                self.log.info("could not read %s: %s", source, cluster.describe_api_error(exc))
                continue
            if result is not None:
                break
        else:
            raise AirflowException(f"{job} succeeded but none of these holds its result: "
                                   f"{'; '.join(source for source, _ in sources)}")
        if source != sources[0][0]:
            self.log.warning("the result comes from %s%s", source,
                             " (no loss history)" if source.startswith("the termination") else "")
        if not result.get("artifacts") and spec.output_uri:
            # The termination message leaves them out to fit 4 KiB: the URIs follow from the output location.
            result["artifacts"] = storage.artifact_uris(spec.output_uri, [])
        return result

    def _return_value(self, result: dict[str, Any], context: Context) -> dict[str, Any]:
        summary = result.get("summary", {})
        self.log.info("training finished: final loss %s (min %s) after %s steps; artifacts: %s",
                      summary.get("final_loss"), summary.get("min_loss"), summary.get("global_step"),
                      json.dumps(result.get("artifacts", {})))
        for change in summary.get(OOM_ADJUSTMENTS_KEY) or []:
            self.log.warning("this run was adjusted after running out of memory: %s", oom.describe(change))
        push_loss_chart(result, self.log, s3=self._s3)  # XCom loss_chart_html, for the Loss chart tab
        self._emit_adapter_asset(result, context)
        self._result = result
        return result

    def _emit_adapter_asset(self, result: dict[str, Any], context: Context) -> None:
        """With ``asset_alias``: an asset event for the adapter's location (its URI: s3://... or file://...), with
        the run's figures as its extra, through the alias (the location is known only once the run ends)."""
        if not self.asset_alias:
            return
        from airflow_provider_lora.compat import Asset, AssetAlias

        artifacts, summary = result.get("artifacts") or {}, result.get("summary") or {}
        adapter = artifacts.get("adapter")
        if not adapter:
            self.log.warning("asset_alias=%r: the result names no adapter, so no asset event", self.asset_alias)
            return
        uri = adapter if "://" in adapter else Path(adapter).absolute().as_uri()  # as the run names it
        extra = {"adapter": adapter, "run": artifacts.get("root"), "base_model": summary.get("base_model"),
                 **{name: summary.get(name) for name in ADAPTER_EVENT_FIGURES}}
        context["outlet_events"][AssetAlias(self.asset_alias)].add(Asset(uri), extra=extra)
        self.log.info("asset event for %s through alias %r: %s", uri, self.asset_alias, json.dumps(extra))

    # ---- OpenLineage: apache-airflow-providers-openlineage calls these when it is installed and configured; they
    # import its client (through airflow_provider_lora.lineage) only then.

    def get_openlineage_facets_on_start(self) -> Any:
        """The dataset and base model in, the adapter's location out (none on a dry run)."""
        from airflow_provider_lora.lineage import operator_lineage

        return operator_lineage(self._spec(), dry_run=self._dry_run_settings()[0])

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """As on start, with the adapter where the run published it and the run's figures as a run facet."""
        from airflow_provider_lora.lineage import operator_lineage

        return operator_lineage(self._spec(), self._result, dry_run=self._dry_run_settings()[0])

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self.get_openlineage_facets_on_start()

    def _clean_up(self, job: cluster.LaunchedPod, succeeded: bool, stop: bool = False) -> None:
        if stop:
            why = "it must not run on unwatched"
        elif self.on_finish_action == "delete_pod" or (self.on_finish_action == "delete_succeeded_pod" and succeeded):
            why = f"on_finish_action={self.on_finish_action}"
        else:
            return
        if job.delete():
            self.log.info("deleted %s (%s)", job, why)
        else:
            self.log.info("%s is already gone: nothing to delete", job)

    def on_kill(self) -> None:
        if self._launched is None:
            return
        from airflow_provider_lora import kube

        job = self._job(kube.sync_core_api(self._cluster_ref), *self._launched)
        if job.delete():
            self.log.info("deleted %s (task killed)", job)


def _task_of(ti: Any, deployment: str) -> dict[str, Any] | None:
    """The task instance, every try alike, as a published run records it (summary.json "task")."""
    if ti is None:
        return None
    return {"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id,
            "map_index": getattr(ti, "map_index", -1), "deployment": deployment}


def _add_task_env(manifest: dict[str, Any], task: dict[str, Any] | None) -> None:
    """Tell the trainer which task instance launches it (it records it with the run)."""
    from airflow_provider_lora.core.contract import TASK_ENV

    if task is not None:
        _set_trainer_env(manifest, TASK_ENV, json.dumps(task, sort_keys=True))


def _set_trainer_env(manifest: dict[str, Any], name: str, value: str) -> None:
    """Set ``name`` in the trainer's environment. '$' is doubled: Kubernetes expands $(VAR) in env values, and
    the value may hold the user's text."""
    from airflow_provider_lora.core.render import TRAINER_CONTAINER

    item = {"name": name, "value": value.replace("$", "$$")}
    body = manifest["spec"]
    holders = ([body["trainer"]] if manifest["kind"] == "TrainJob" else
               [c for c in body["containers"] if c.get("name") == TRAINER_CONTAINER])
    for holder in holders:
        holder["env"] = [*(e for e in holder.get("env") or [] if e.get("name") != name), item]


def _task_timeout(message: str) -> Exception:
    try:
        from airflow.sdk.exceptions import AirflowTaskTimeout
    except ImportError:  # Airflow 2
        from airflow.exceptions import AirflowTaskTimeout
    return AirflowTaskTimeout(message)


def _check_image(image: str | None, launcher: str) -> None:
    """At DAG parse: the pod and TrainJob launchers need an image that can exist (templated ones are checked once
    rendered, by PodOptions)."""
    example = "'registry.example.com/team/lora-trainer:0.1.0'"
    if not image:
        raise ValueError(f"image=None is not valid with launcher={launcher!r}: give the training image you built from "
                         f"trainer/Dockerfile and pushed, such as image={example}, or set it for every task as "
                         "[lora] image in the Airflow configuration (AIRFLOW__LORA__IMAGE); this project publishes "
                         "no image. launcher='local' needs none")
    if "{{" not in image and not IMAGE_REFERENCE.match(image):
        raise ValueError(f"image={image!r} is not valid: expected an image reference such as {example} (lowercase "
                         "path, optional :tag or @sha256:...)")


def _check_s3_endpoint(url: str) -> None:
    if not _is_http_url(url):
        raise ValueError(f"s3_endpoint_url={url!r} is not valid: give an http(s) URL such as "
                         "'http://minio.minio:9000'")


def _is_http_url(text: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _signature() -> inspect.Signature:
    """The operator's signature with every pod option and spec field as a keyword argument, for help() and IDEs."""
    own = inspect.signature(LoRATrainingOperator.__init__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    derived = [(name, PodOptions.model_fields[name]) for name in POD_FIELDS] + list(LoRASpec.model_fields.items())
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation,
                                 default=field.get_default(call_default_factory=True)) for name, field in derived]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return own.replace(parameters=params)


LoRATrainingOperator.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
