"""Security: secrets stay secret, pods meet the Pod Security Standards "restricted" profile, no user string reaches
a shell or Kubernetes' $(VAR) expansion, paths cannot traverse, labels/annotations/env cannot be injected, and the
operator works within the minimal RBAC Role shipped in docs/rbac.yaml (enforced by the emulated API server).

The canary run is a real one: the operator under dag.test(), the real trainer in an emulated pod, S3 on moto, the
HF token and S3 keys as Kubernetes Secrets. Afterwards every place a value could leak to is searched for the canary
values (plain and base64). Counts: docs/reliability.md.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from airflow_provider_lora.core.render import PodOptions, SecretRef, TaskIdentity, render_pod
from airflow_provider_lora.core.spec import LoRASpec

REPO = Path(__file__).resolve().parents[1]
HF_CANARY = "hf_CANARY7f3e9a1c0b5d2e8f4a6c"
S3_ID_CANARY = "AKIACANARY4F7D2E9B1C"
S3_SECRET_CANARY = "canarySecret+8e1f0c3b7a9d5e2f6c4b1a0d9e8f7c6b"
CANARIES = (HF_CANARY, S3_ID_CANARY, S3_SECRET_CANARY)
ROLE = next(d for d in yaml.safe_load_all((REPO / "docs" / "rbac.yaml").read_text()) if d["kind"] == "Role")


def leaks(text: str) -> list[str]:
    """The canaries found in ``text``, as themselves or base64-encoded (as a Secret's data holds them)."""
    forms = {c: (c, base64.b64encode(c.encode()).decode()) for c in CANARIES}
    return [c for c, variants in forms.items() if any(v in text for v in variants)]


# ---- Pod Security Standards, "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/) --

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pss_restricted_violations(pod: dict) -> list[str]:
    """Each rule of the baseline and restricted profiles (v1.30+) that ``pod`` breaks, as a readable line."""
    spec, bad = pod.get("spec") or {}, []
    psc = spec.get("securityContext") or {}
    containers = [("containers", c) for c in spec.get("containers") or []] + \
        [("initContainers", c) for c in spec.get("initContainers") or []] + \
        [("ephemeralContainers", c) for c in spec.get("ephemeralContainers") or []]
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"{field} must be false")
    for name, value in [(s.get("name"), s.get("value")) for s in psc.get("sysctls") or []]:
        if name not in SAFE_SYSCTLS:
            bad.append(f"sysctl {name}={value} is not in the safe set")
    for vol in spec.get("volumes") or []:
        kind = next((k for k in vol if k != "name"), None)
        if kind == "hostPath":
            bad.append(f"volume {vol['name']}: hostPath volumes are forbidden")
        elif kind not in RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']}: type {kind} is not allowed by restricted")
    for where, sc in [("pod", psc)] + [(f"{k} {c.get('name')}", c.get("securityContext") or {}) for k, c in containers]:
        if (sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES or \
                {"user", "role"} & set(sc.get("seLinuxOptions") or {}):
            bad.append(f"{where}: seLinuxOptions not allowed")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{where}: seccompProfile Unconfined")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: appArmorProfile must be RuntimeDefault or Localhost")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
    for kind, c in containers:
        sc, where = c.get("securityContext") or {}, f"{kind} {c.get('name')}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{where}: hostPort {port['hostPort']}")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            bad.append(f"{where}: capabilities {sorted(added - BASELINE_CAPABILITIES)} beyond baseline")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and
                                                   sc.get("runAsNonRoot") is not False)):
            bad.append(f"{where}: runAsNonRoot must be true (pod or container)")
        profile = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            bad.append(f"{where}: capabilities must drop ALL")
        if added - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: only NET_BIND_SERVICE may be added")
    return bad


SPEC = LoRASpec.parse(dict(base_model="org/model", dataset="/mnt/lora/data/train.jsonl",
                           output_uri="/mnt/lora/runs/r1", envs="NCCL_DEBUG=INFO", metadata_labels="team=nlp"))
IDENTITY = TaskIdentity(dag_id="finetune", task_id="train", run_id="manual__2026-01-01")
IMAGE = "registry.example/lora-trainer:0.1.0"
OPTIONS = PodOptions(image=IMAGE, pvc_claim_name="workspace",
                     secret_env={"HF_TOKEN": SecretRef(name="hf", key="token")},
                     image_pull_secrets=("registry",))


def test_the_rendered_pod_meets_the_restricted_profile():
    assert pss_restricted_violations(render_pod(SPEC, OPTIONS, IDENTITY)) == []


def test_a_pod_template_cannot_weaken_what_the_operator_sets():
    template = {"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}, "runAsNonRoot": False},
                         "containers": [{"name": "trainer", "securityContext": {
                             "allowPrivilegeEscalation": True, "seccompProfile": {"type": "Unconfined"},
                             "capabilities": {"drop": []}}}]}}
    pod = render_pod(SPEC, OPTIONS.model_copy(update={"pod_template": template}), IDENTITY)
    assert pss_restricted_violations(pod) == []


@pytest.mark.parametrize("template, rule", [
    ({"spec": {"hostNetwork": True}}, "hostNetwork must be false"),
    ({"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "hostPath volumes are forbidden"),
    ({"spec": {"containers": [{"name": "trainer", "securityContext": {"privileged": True}}]}}, "privileged"),
    ({"spec": {"containers": [{"name": "trainer", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}},
     "beyond baseline"),
    ({"spec": {"securityContext": {"runAsUser": 0}}}, "runAsUser 0"),
    ({"spec": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "65536"}]}}},
     "not in the safe set"),
    ({"spec": {"initContainers": [{"name": "init", "image": "busybox"}]}}, "allowPrivilegeEscalation must be false"),
])
def test_the_checker_finds_what_a_pod_template_can_break(template, rule):
    """The checker can fail: a pod_template is merged under our settings and can add what the profile forbids
    (docs/reliability.md: enforce the profile with the namespace's pod-security label)."""
    pod = render_pod(SPEC, OPTIONS.model_copy(update={"pod_template": template}), IDENTITY)
    assert any(rule in v for v in pss_restricted_violations(pod)), pss_restricted_violations(pod)


# ---- no shell ---------------------------------------------------------------------------------------------------------

def test_no_code_hands_a_string_to_a_shell():
    """shell=True, os.system, os.popen or a 'sh -c' in the package or the trainer would let a string be parsed by a
    shell; none exists (the pod's command is an argv list, the local launcher runs an argv list)."""
    sources = [p for root in ("airflow_provider_lora", "trainer/lora_trainer") for p in (REPO / root).rglob("*.py")]
    assert len(sources) > 10
    pattern = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|[\"'](ba)?sh[\"']\s*,\s*[\"']-c[\"']|"
                         r"create_subprocess_shell|commands\.getoutput")
    found = [f"{p.relative_to(REPO)}:{n}" for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == []


def test_hostile_strings_stay_inside_one_argv_element():
    hostile = "'; rm -rf / #\"$(id)`id`\n&& curl x | sh"
    spec = LoRASpec.parse(dict(base_model="org/model", dataset=f"s3://b/{hostile.replace(chr(10), ' ')}",
                               output_uri="s3://b/out", envs=f"NOTE={hostile.replace(',', ' ')}",
                               metadata_annotations=f"example.com/note={hostile.replace(',', ' ')}"))
    pod = render_pod(spec, PodOptions(image=IMAGE), IDENTITY)
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "lora_trainer"] and "args" not in pod["spec"]["containers"][0]
    assert command[3] == "--spec-json" and len(command) == 7  # the whole spec is one argument
    assert json.loads(command[4].replace("$$", "$"))["dataset"] == spec.dataset
    assert not any(c in ("sh", "bash", "-c") for c in command)


def test_an_archive_extraction_does_not_exist_to_be_traversed():
    """Path traversal through archives (tar/zip members named ../x): nothing in the package or the trainer
    extracts an archive, so there is no such path; S3 keys holding '..' are refused by storage.download
    (tests/test_storage.py)."""
    sources = [p for root in ("airflow_provider_lora", "trainer/lora_trainer") for p in (REPO / root).rglob("*.py")]
    pattern = re.compile(r"\b(tarfile|zipfile|unpack_archive|extractall)\b")
    assert [str(p) for p in sources if pattern.search(p.read_text())] == []


# ---- injection -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"metadata_labels": "lora.airflow-provider/task_id=other"}, "reserved"),
    ({"metadata_annotations": "lora.airflow-provider/log-cursor=2099-01-01T00:00:00Z 999"}, "reserved"),
    ({"metadata_labels": "app.kubernetes.io/managed-by=someone"}, "reserved"),
])
def test_the_operators_own_labels_and_annotations_cannot_be_set_by_the_user(values, message):
    """A user annotation at the log cursor's key would make the trigger skip the whole log; a user label at an
    identity key would make another task's retry adopt this pod."""
    spec = LoRASpec.parse(dict(base_model="org/model", dataset="d", output_uri="s3://b/o", **values))
    with pytest.raises(ValueError, match=message):
        render_pod(spec, PodOptions(image=IMAGE), IDENTITY)


@pytest.mark.parametrize("envs, fragment", [
    ("LD_PRELOAD=/mnt/lora/evil.so", "changes which code the trainer runs"),
    ("PYTHONPATH=/mnt/lora/evil", "changes which code the trainer runs"),
    ("PYTHONSTARTUP=/mnt/lora/evil.py", "changes which code the trainer runs"),
    ("A=1,B;rm=2", "not an environment variable name"),
    ("GITHUB_TOKEN=x", "looks like a secret"),
])
def test_env_injection_is_refused(envs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        LoRASpec.parse(dict(envs=envs))


def test_a_dollar_variable_in_a_spec_string_is_not_expanded_by_kubernetes(k8s_cluster, tmp_path):
    """Kubernetes expands $(VAR) in a container's command: dataset='$(HF_TOKEN)' once reached the trainer as the
    token's value, which its error message then printed. The real trainer in an emulated pod (the emulator expands
    $(VAR) as the kubelet does) must see the string as written."""
    k8s_cluster.create_secret("default", "hf", {"token": HF_CANARY})
    k8s_cluster.base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    mount = str(k8s_cluster.root / "mnt" / "lora")
    spec = LoRASpec.parse(dict(base_model="org/model", dataset=f"{mount}/$(HF_TOKEN).jsonl",
                               output_uri=f"{mount}/out", envs="HF_HUB_OFFLINE=1,HF_DATASETS_OFFLINE=1"))
    pod = render_pod(spec, PodOptions(image=IMAGE, pvc_claim_name="ws", pvc_mount_path=mount,
                                      secret_env={"HF_TOKEN": SecretRef(name="hf", key="token")}),
                     TaskIdentity(dag_id="d", task_id="t", run_id="r"))
    from tests.test_pod_launcher import create

    create(k8s_cluster, pod)
    name = pod["metadata"]["name"]
    done = k8s_cluster.wait_for_pod("default", name, timeout=180)
    log = k8s_cluster.logs("default", name)
    assert done["status"]["phase"] == "Failed" and "$(HF_TOKEN).jsonl" in log, log[-2000:]
    assert leaks(log + json.dumps(done)) == []


# ---- the canary run: a real training, then every place searched -------------------------------------------------------

@pytest.mark.slow
def test_canary_secrets_never_leave_their_secrets(k8s_emu, airflow_db, tiny_model_dir, tmp_path, s3_endpoint,
                                                  s3_bucket, caplog, capfd):
    import logging

    import boto3
    from airflow.sdk import DAG

    from airflow_provider_lora.operators.lora import LoRATrainingOperator
    from tests.fixtures.airflow import K8S_EMU, run_dag_test
    from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

    caplog.set_level(logging.INFO)
    cluster = k8s_emu  # the connection k8s_emu points at it
    cluster.base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    cluster.create_secret("default", "hf-token", {"token": HF_CANARY})
    cluster.create_secret("default", "s3-creds", {"id": S3_ID_CANARY, "secret": S3_SECRET_CANARY})
    cluster.rbac_rules = ROLE["rules"]  # the operator and trigger work within docs/rbac.yaml
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    with DAG("lora_canary", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        task = LoRATrainingOperator(
            task_id="train", launcher="pod", kubernetes_conn_id=K8S_EMU, poll_interval=0.3, startup_timeout=60,
            deferrable=True, on_finish_action="keep_pod", base_model=str(tiny_model_dir), dataset=str(dataset),
            output_uri=f"s3://{s3_bucket}/runs/{{{{ run_id }}}}",
            envs=f"AWS_ENDPOINT_URL={s3_endpoint},AWS_DEFAULT_REGION=us-east-1,HF_HUB_OFFLINE=1",
            hf_token_secret="hf-token/token",
            secret_env={"AWS_ACCESS_KEY_ID": "s3-creds/id", "AWS_SECRET_ACCESS_KEY": "s3-creds/secret"},
            resource_gpu_per_worker=0, resource_cpu_per_worker="2", resource_memory_per_worker="4Gi",
            **{**FAST, "max_steps": 3})
    run = run_dag_test(dag)
    task_log = caplog.text + "".join(capfd.readouterr())
    assert run.state == "success", task_log[-3000:]
    assert "[lora-trainer] step 3/3" in task_log  # the task log was captured: the search below can find things

    places: dict[str, str] = {"task log": task_log}
    places["rendered manifest"] = json.dumps(render_pod(task._spec(), task._options(), IDENTITY))
    [pod] = cluster.pods()
    places["stored pod"] = json.dumps(pod)
    places["pod log"] = cluster.logs("default", pod["metadata"]["name"])
    places["events"] = json.dumps(cluster._call(lambda: list(cluster._store["events"].values())))
    places["configmaps"] = json.dumps(cluster._call(lambda: list(cluster._store["configmaps"].values())))
    places["requests"] = json.dumps(cluster.request_log)
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == dag.dag_id).all()
        places["xcom"] = json.dumps([[r.key, r.value] for r in rows], default=str)
    assert "loss_chart_html" in places["xcom"] and "summary" in places["xcom"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.endswith("loss_chart.png") for k in keys) and any(k.endswith("adapter_model.safetensors")
                                                                  for k in keys)
    for key in keys:  # artifacts: adapter, tokenizer, metrics, summary, chart (HTML and PNG), marker
        places[f"artifact {key}"] = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode("latin-1")
    for log in (Path(os.environ["AIRFLOW_HOME"]) / "logs").rglob("*") if (
            Path(os.environ["AIRFLOW_HOME"]) / "logs").exists() else []:
        if log.is_file():
            places[f"log file {log.name}"] = log.read_text(errors="replace")

    found = {place: leaks(text) for place, text in places.items() if leaks(text)}
    assert found == {}
    assert len(places) >= 10
    # The secrets did reach the trainer: the pod references them, and the upload used the canary key id.
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert pss_restricted_violations(pod) == []  # as stored, after the API server's defaults
    assert cluster.denied == []


# ---- RBAC: the operator within docs/rbac.yaml --------------------------------------------------------------------------

def test_the_pod_launcher_works_within_the_shipped_role(k8s_cluster, s3_endpoint, monkeypatch):
    """Create, follow (status, log, cursor patch), fail on a stuck pod (events), replace a failed pod, kill: every
    request the operator and the trigger make is allowed by the Role; and the Role's pod rules are all used."""
    from airflow.exceptions import TaskDeferred

    from airflow_provider_lora.core import render
    from tests.test_reliability_faults import RESULT, StandInTI, operator

    k8s_cluster.rbac_rules = ROLE["rules"]
    script = {"text": "import time; print('x', flush=True); time.sleep(1); " + RESULT}
    monkeypatch.setattr(render, "trainer_argv", lambda spec, nproc: ["python", "-c", script["text"]])
    k8s_cluster.set_fault("oom", pod="lora-*", after_lines=1)
    with pytest.raises(Exception, match="OOMKilled"):
        operator(k8s_cluster).execute({"ti": StandInTI(try_number=1)})
    assert operator(k8s_cluster).execute({"ti": StandInTI(try_number=2)})["summary"]["global_step"] == 1
    k8s_cluster.set_fault("unschedulable", pod="lora-*", times=1)
    with pytest.raises(Exception, match="Unschedulable"):
        operator(k8s_cluster, startup_timeout=1).execute({"ti": StandInTI(run_id="r2")})
    script["text"] = "import time; time.sleep(60)"
    op = operator(k8s_cluster, deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute({"ti": StandInTI(run_id="r3")})
    op.on_kill()
    assert k8s_cluster.denied == []
    used = {(m, p.rsplit("/", 1)[-1] if p.endswith("/log") else p.split("/")[5] if p.count("/") >= 5 else "")
            for m, p, _ in k8s_cluster.request_log}
    verbs = {("POST", "pods"), ("GET", "pods"), ("PATCH", "pods"), ("DELETE", "pods"), ("GET", "log"),
             ("GET", "events")}
    assert verbs <= used, verbs - used


def test_a_request_outside_the_role_is_refused_and_recorded(k8s_cluster):
    """The enforcement can fail a test: without pods/log the trigger's log reads are refused (it survives them, as
    logs are a courtesy, but each refusal is recorded and a test of the Role would fail on it)."""
    from tests.test_pod_launcher import cheap_pod, create, first_event, trigger

    create(k8s_cluster, cheap_pod("nolog", "print('hello')"))
    k8s_cluster.rbac_rules = [r for r in ROLE["rules"] if r["resources"] != ["pods/log"]]
    assert first_event(trigger(k8s_cluster, "nolog"))["status"] == "success"
    assert ("get", "", "pods/log", "default") in k8s_cluster.denied
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)))
    with pytest.raises(client.exceptions.ApiException) as info:
        api.read_namespaced_secret("anything", "default")
    assert info.value.status == 403 and "secrets is forbidden" in info.value.body


def test_the_trainjob_launcher_works_within_the_shipped_role(k8s_cluster):
    """launcher="trainjob": create the TrainJob, follow it (TrainJob status, its node pods, rank 0's log), kill it:
    all within the Role's trainjobs and pods rules."""
    import asyncio

    from airflow_provider_lora.kube import close_shared_clients
    from airflow_provider_lora.triggers.lora import LoRATrainingTrigger
    from tests.test_trainjob import _sleeping_trainjob

    k8s_cluster.base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    k8s_cluster.rbac_rules = ROLE["rules"]
    _sleeping_trainjob(k8s_cluster)
    trigger = LoRATrainingTrigger(name="lora-sleeper", namespace="default", launcher="trainjob",
                                  config_file=str(k8s_cluster.kubeconfig), kubernetes_conn_id=None, poll_interval=0.2)

    async def follow_then_kill():
        try:
            waiting = asyncio.ensure_future(trigger.run().__anext__())
            await asyncio.sleep(1.5)
            assert not waiting.done()  # still running: followed without an error event
            waiting.cancel()
            await trigger.on_kill()
        finally:
            await close_shared_clients()
    asyncio.run(follow_then_kill())
    assert k8s_cluster.denied == []
    methods = {(m, p.split("/")[-1] if "trainjobs" not in p else "trainjobs") for m, p, _ in k8s_cluster.request_log
               if "/namespaces/" in p}
    assert {("POST", "trainjobs"), ("GET", "trainjobs"), ("DELETE", "trainjobs"), ("GET", "pods")} <= methods, methods
    assert k8s_cluster.trainjobs() == []
