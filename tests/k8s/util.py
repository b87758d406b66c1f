"""Kubernetes API machinery for the emulator: Status errors, selectors, merge patch, timestamps, TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

NODE, HOST_IP = "emulator-node-1", "10.0.0.10"
UNSCHEDULABLE = ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: "
                 "3 No preemption victims found for incoming pod.")
EVICTED = ("The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. Container {container} "
           "was using 30Gi, request is 16Gi, has larger consumption of memory.")
KINDS = {"pods": "Pod", "secrets": "Secret", "configmaps": "ConfigMap", "events": "Event"}
# Field selectors the real API server accepts per resource (others are a 400, as there).
FIELDS = {
    "pods": {"metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
             "spec.serviceAccountName", "status.phase", "status.podIP", "status.nominatedNodeName"},
    "events": {"metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.namespace",
               "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion",
               "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason", "reportingComponent",
               "source", "type"},
    "secrets": {"metadata.name", "metadata.namespace", "type"},
    "configmaps": {"metadata.name", "metadata.namespace"},
    "trainjobs": {"metadata.name", "metadata.namespace"},  # what every custom resource supports
}
FAULTS = {  # kind -> the parameters it takes (besides pod and times); see emulator.py
    "oom": {"after_seconds", "after_lines", "container"},
    "evict": {"after_seconds", "after_lines", "container", "message"},
    "node_lost": {"after_seconds", "after_lines", "container", "not_ready_after", "evict_after", "gc_after"},
    "unschedulable": {"message"},
    "image_pull_backoff": {"message", "backoff_after"},
    "api_error": {"path", "method", "status"},
    "api_timeout": {"path", "method", "seconds"},
    "log_stream_drop": {"after_lines", "mode"},
    "watch_drop": {"path", "method", "after_events", "mode"},  # `path` a regex, as api faults
    "trainjob_creation_failed": {"message"},  # trainer_controller.py; `pod` globs the TrainJob's name
}
RUNTIME_FAULTS = ("oom", "evict", "node_lost")


def _now_s() -> str:  # metav1.Time: whole seconds, UTC
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _nano(ns: int) -> str:  # the kubelet's log timestamp: RFC3339Nano with a fixed 9 digits
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class ApiError(Exception):
    """Answered as a Kubernetes `Status` object."""

    REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 409: "AlreadyExists",
               415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
               503: "ServiceUnavailable"}

    def __init__(self, code: int, message: str, reason: str | None = None, headers: dict | None = None, **details):
        super().__init__(message)
        self.code, self.message, self.headers, self.details = code, message, headers, details
        self.reason = reason or self.REASONS.get(code, "InternalError")

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}

    def response(self) -> web.Response:
        return _json(self.status(), self.code, self.headers)


def check_preconditions(obj: dict, preconditions: dict | None, resource: str, name: str) -> None:
    """DeleteOptions.preconditions as kube-apiserver checks them (k8s.io/apiserver pkg/storage Preconditions.Check,
    answered as a Conflict): the object must still have that uid / resourceVersion."""
    for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        wanted, actual = (preconditions or {}).get(field), obj["metadata"].get(field)
        if wanted is not None and wanted != actual:
            raise ApiError(409, f'Operation cannot be fulfilled on {resource} "{name}": Precondition '
                                f"failed: {label} in precondition: {wanted}, {label} in object meta: {actual}",
                           reason="Conflict", name=name, kind=resource.partition(".")[0])


def _json(obj: Any, code: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(), status=code,
                        content_type="application/json", headers=headers)


def _flag(query, name: str) -> bool:  # the sync client sends True, kubernetes_asyncio sends true or True
    return query.get(name, "").lower() in ("true", "1")


def _int(query, name: str) -> int | None:
    try:
        return int(query[name]) if name in query else None
    except ValueError:
        raise ApiError(400, f"invalid {name}: {query[name]!r}") from None


def label_selector(text: str) -> Callable[[dict], bool]:
    """`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma-separated (commas inside () kept)."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    reqs = []
    for term in (t.strip() for t in terms if t.strip()):
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            reqs.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
        elif m := re.fullmatch(r"(!?)\s*([\w./-]+)", term):
            reqs.append((m[2], "!exists" if m[1] else "exists", None))
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r}")
    tests = {"=": lambda l, k, v: l.get(k) == v, "!=": lambda l, k, v: l.get(k) != v,
             "in": lambda l, k, v: l.get(k) in v, "notin": lambda l, k, v: l.get(k) not in v,
             "exists": lambda l, k, v: k in l, "!exists": lambda l, k, v: k not in l}
    return lambda obj: all(tests[op]((obj["metadata"].get("labels") or {}), k, v) for k, op, v in reqs)


def _field(obj: dict, path: str) -> str:
    if path == "source":
        return (obj.get("source") or {}).get("component", "")
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path):
        return (obj["metadata"].get(m[1]) or {}).get(m[2], "")
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def field_selector(resource: str, text: str) -> Callable[[dict], bool]:
    reqs = []
    for term in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiError(400, f"invalid selector: '{text}'; can't understand '{term}'")
        if m[1] not in FIELDS.get(resource, set()):
            raise ApiError(400, f'field label not supported: {m[1]}')
        reqs.append((m[1], m[2] == "!=", m[3]))
    return lambda obj: all((_field(obj, k) == v) != neg for k, neg, v in reqs)


def _merge_patch(target: dict, patch: dict) -> dict:  # RFC 7386
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_patch(target[key], value)
        else:
            target[key] = value
    return target


def _age(created: str) -> str:  # kubectl's short human duration
    s = max(0, int(time.time() - dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 10800 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _make_tls(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1/localhost, made fresh for each cluster."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8s-emulator-ca")])

    def cert(subject, pub, ca: bool, extra=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True))
        for ext in extra:
            b = b.add_extension(ext, critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca = cert(ca_name, ca_key.public_key(), True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), key.public_key(), False, [
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.crt").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
    return directory / "ca.crt", ctx
