"""What a real API server refuses, so the emulator refuses it too (Kubernetes 1.33 semantics).

An emulator that accepts anything that parses hides the defects a cluster finds at once: every pod we rendered once
carried the label value "-1", which every real API server refuses. Each check here follows the real one:

- Object schemas: Kubernetes' published OpenAPI definitions, as the `kubernetes-validate` package ships them (its
  strict variant: no unknown fields). Unknown fields follow the request's `fieldValidation`: Strict answers 400
  `... cannot be handled as a Pod: strict decoding error: unknown field "spec.foo"`; Warn (the default since 1.27)
  and Ignore drop them, Warn with one `Warning: 299 - "unknown field \"spec.foo\""` header each. A value of the
  wrong type is a 400 decode error whatever the level.
- The checks no schema expresses (k8s.io/kubernetes pkg/apis/core/validation and apimachinery's validation
  package): object names, label keys and values, annotation keys and total size, resource quantities, requests
  not above limits, extended resources (nvidia.com/gpu) integral with requests equal to limits, volume and
  container names unique DNS labels, volume mounts naming a volume, mount paths unique, environment variable
  names, enums (restartPolicy, imagePullPolicy, terminationMessagePolicy, toleration operator and effect,
  seccomp type). Refused with 422 Invalid and one cause per field, as the real Status carries them.
- Pod Security admission: a namespace labelled `pod-security.kubernetes.io/enforce: baseline|restricted` refuses
  a pod that breaks the profile (403 Forbidden, `violates PodSecurity "restricted:latest": ...`), the checks of
  the Pod Security Standards for the latest version.
- Custom resources (Kubeflow Trainer): the CRD's structural schema (pruning of unknown fields, types, enums,
  required, bounds, patterns) and its `x-kubernetes-validations` CEL rules, evaluated with cel-python.

Not checked (a real API server does): container ports, probes, DNS config, topology spread and affinity
internals, projected volume sources, immutability of pod spec fields on update (the emulator allows only
metadata patches on pods anyway).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterator

import jsonschema
import referencing
from kubernetes_validate import utils as kv

from tests.k8s.util import ApiError

K8S_VERSION = "1.33"

# ---- field errors as the API server words them (apimachinery pkg/util/validation/field) ------------------------

_TYPE_TEXT = {"Invalid": "Invalid value", "Required": "Required value", "Duplicate": "Duplicate value",
              "NotFound": "Not found", "NotSupported": "Unsupported value", "TooLong": "Too long",
              "Forbidden": "Forbidden"}


@dataclass
class FieldError:
    type: str  # a key of _TYPE_TEXT
    field: str
    value: Any = None
    detail: str = ""

    def body(self) -> str:
        text = _TYPE_TEXT[self.type]
        if self.type not in ("Required", "Forbidden", "TooLong"):
            # apimachinery quotes strings, prints numbers and booleans as they are, and names composite values
            shown = {dict: "object", list: "array"}.get(type(self.value), self.value)
            text += ": " + json.dumps(shown)
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> dict:
        return {"reason": "FieldValue" + self.type, "message": self.body(), "field": self.field}


def invalid(kind: str, name: str, errors: list[FieldError], group: str = "", resource: str = "") -> ApiError:
    """422 Invalid: `Pod "x" is invalid: [a, b]` with one cause per error (one error: no brackets)."""
    qualified = f"{kind}.{group}" if group else kind
    text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    details = {"name": name, "kind": resource or kind.lower() + "s", "causes": [e.cause() for e in errors]}
    if group:
        details["group"] = group
    return ApiError(422, f'{qualified} "{name}" is invalid: {text}', **details)


def undecodable(kind: str, version: str, detail: str) -> ApiError:
    """400 BadRequest: what the API server answers when the body does not decode into the type."""
    return ApiError(400, f'{kind} in version "{version}" cannot be handled as a {kind}: {detail}')


def unknown_field_warnings(paths: list[str]) -> dict:
    """The Warning header of fieldValidation=Warn: one `299 - "..."` entry per dropped field."""
    if not paths:
        return {}
    return {"Warning": ", ".join(f'299 - "unknown field \\"{p}\\""' for p in paths)}


def strict_refusal(kind: str, version: str, paths: list[str]) -> ApiError:
    return undecodable(kind, version, "strict decoding error: " + ", ".join(f'unknown field "{p}"' for p in paths))


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _delete(obj: Any, parts: list) -> None:
    for p in parts[:-1]:
        obj = obj[p]
    obj.pop(parts[-1], None)


# ---- Kubernetes' own types: the published OpenAPI schema -----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _core_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    """A strict (no additional properties) JSON-schema validator for a core/v1 kind, from kubernetes-validate."""
    full = kv.latest_version() if version == "latest" else next(
        v for v in reversed(kv.all_versions()) if kv.major_minor(v) == version)
    folder = f"kubernetes-json-schema/v{full}-local-strict"
    schema = kv.schema_contents(f"{folder}/{kind.lower()}-v1.json", version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def check_core_schema(obj: dict, field_validation: str | None, version: str = K8S_VERSION) -> list[str]:
    """Validate a core/v1 object against its published schema: raises the API server's 400 for a value of the
    wrong type and, under Strict, for unknown fields; otherwise drops unknown fields from ``obj`` and returns
    their paths (for the Warn header)."""
    kind = obj.get("kind", "")
    unknown: list[list] = []
    for error in _core_validator(kind, version).iter_errors(obj):
        where = list(error.absolute_path)
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties", {}))
            unknown += [where + [key] for key in error.instance if key not in known]
        elif error.validator in ("type", "oneOf") and error.instance is not None:
            expected = [t for t in error.schema.get("type", ["string or number"]) if t != "null"]
            raise undecodable(kind, "v1", f"json: cannot unmarshal {_json_type(error.instance)} into Go struct "
                                          f"field {_path(where)} of type {expected[0]}")
        elif error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            raise invalid(kind, (obj.get("metadata") or {}).get("name", ""),
                          [FieldError("Required", _path(where + missing))])
    paths = [_path(p) for p in unknown]
    if paths and field_validation == "Strict":
        raise strict_refusal(kind, "v1", paths)
    for parts in sorted(unknown, key=len, reverse=True):
        _delete(obj, parts)
    return paths if field_validation != "Ignore" else []


# ---- the checks no schema expresses (apimachinery's validation package, pkg/apis/core/validation) -------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}
TOTAL_ANNOTATION_SIZE = 256 * 1024  # apimachinery's TotalAnnotationSizeLimitB

MSG_DNS1123_LABEL = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                     "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used "
                     "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
MSG_DNS1123_SUBDOMAIN = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                         "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
                         "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
MSG_DNS1035_LABEL = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                     "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                     "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")
MSG_QUALIFIED_NAME = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                      "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                      "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
MSG_LABEL_VALUE = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                   "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                   "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
MSG_QUANTITY = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"


def dns1123_label(value: str) -> list[str]:
    out = [] if _DNS1123_LABEL.fullmatch(value) else [MSG_DNS1123_LABEL]
    return out + (["must be no more than 63 characters"] if len(value) > 63 else [])


def dns1123_subdomain(value: str) -> list[str]:
    out = [] if _DNS1123_SUBDOMAIN.fullmatch(value) else [MSG_DNS1123_SUBDOMAIN]
    return out + (["must be no more than 253 characters"] if len(value) > 253 else [])


def dns1035_label(value: str) -> list[str]:
    out = [] if _DNS1035_LABEL.fullmatch(value) else [MSG_DNS1035_LABEL]
    return out + (["must be no more than 63 characters"] if len(value) > 63 else [])


def qualified_name(value: str) -> list[str]:
    """A label or annotation key: [prefix/]name, prefix a DNS subdomain, name <= 63 characters."""
    prefix, _, name = value.rpartition("/") if "/" in value else ("", "", value)
    out = []
    if value.count("/") > 1:
        return ["a qualified name " + MSG_QUALIFIED_NAME + " with an optional DNS subdomain prefix and '/' "
                "(e.g. 'example.com/MyName')"]
    if "/" in value:
        out += ["prefix part " + m for m in dns1123_subdomain(prefix)] if prefix else ["prefix part must be non-empty"]
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > 63:
        out.append("name part must be no more than 63 characters")
    elif not _QUALIFIED_NAME.fullmatch(name):
        out.append(MSG_QUALIFIED_NAME)
    return out


def domain_prefixed_path(value: str) -> list[str]:
    """apimachinery's IsDomainPrefixedPath: `domain/path`, e.g. "acme.io/foo"."""
    domain, slash, path = value.partition("/")
    if not slash or not domain or not path:
        return ['must be a domain-prefixed path (such as "acme.io/foo")']
    return dns1123_subdomain(domain)


def parse_quantity(value: Any) -> Decimal:
    """A resource.Quantity's value; ValueError when it does not parse (the API server answers 400 then)."""
    text = str(value)
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(MSG_QUANTITY)
    number, suffix = m.groups()
    try:
        base = Decimal(number)
    except InvalidOperation:
        raise ValueError(MSG_QUANTITY) from None
    if suffix in _SUFFIX:
        return base * _SUFFIX[suffix]
    if re.fullmatch(r"[eE][-+]?[0-9]+", suffix):
        return base * Decimal(10) ** int(suffix[1:])
    raise ValueError("unable to parse quantity's suffix")


def metadata_errors(md: dict, *, name_check=dns1123_subdomain, namespaced: bool = True) -> list[FieldError]:
    errors = []
    name = md.get("name") or ""
    if not name:
        errors.append(FieldError("Required", "metadata.name", detail="name or generateName is required"))
    else:
        errors += [FieldError("Invalid", "metadata.name", name, m) for m in name_check(name)]
    if namespaced and md.get("namespace"):
        errors += [FieldError("Invalid", "metadata.namespace", md["namespace"], m)
                   for m in dns1123_label(md["namespace"])]
    for key, value in (md.get("labels") or {}).items():
        errors += [FieldError("Invalid", "metadata.labels", key, m) for m in qualified_name(key)]
        if not _LABEL_VALUE.fullmatch(str(value)):
            errors.append(FieldError("Invalid", "metadata.labels", value, MSG_LABEL_VALUE))
        elif len(str(value)) > 63:
            errors.append(FieldError("Invalid", "metadata.labels", value, "must be no more than 63 characters"))
    annotations = md.get("annotations") or {}
    for key in annotations:
        errors += [FieldError("Invalid", "metadata.annotations", key, m) for m in qualified_name(key.lower())]
    if sum(len(k) + len(v or "") for k, v in annotations.items()) > TOTAL_ANNOTATION_SIZE:
        errors.append(FieldError("TooLong", "metadata.annotations",
                                 detail=f"may not be more than {TOTAL_ANNOTATION_SIZE} bytes"))
    return errors


def _enum(errors: list, field: str, value: Any, allowed: tuple) -> None:
    if value is not None and value not in allowed:
        errors.append(FieldError("NotSupported", field, value,
                                 "supported values: " + ", ".join(f'"{a}"' for a in allowed)))


def _resources_errors(resources: dict, path: str) -> list[FieldError]:
    errors, parsed = [], {}
    for part in ("limits", "requests"):
        for key, value in (resources.get(part) or {}).items():
            field = f"{path}.{part}[{key}]"
            errors += [FieldError("Invalid", field, key, m) for m in qualified_name(key)]
            try:
                quantity = parse_quantity(value)
            except ValueError as e:  # the API server fails to decode such a body: 400, not 422
                raise undecodable("Pod", "v1", str(e)) from None
            parsed[(part, key)] = quantity
            if quantity < 0:
                errors.append(FieldError("Invalid", field, str(value), "must be greater than or equal to 0"))
            if "/" in key and not key.startswith("kubernetes.io/") and quantity != quantity.to_integral_value():
                errors.append(FieldError("Invalid", field, str(value), "must be an integer"))
    for (part, key), request in parsed.items():
        if part != "requests":
            continue
        limit = parsed.get(("limits", key))
        extended = "/" in key and not key.startswith(("kubernetes.io/", "requests."))
        if extended and limit is None:  # GPUs and other extended resources cannot be overcommitted
            errors.append(FieldError("Required", f"{path}.limits",
                                     detail="Limit must be set for non overcommitable resources"))
        elif extended and request != limit:
            errors.append(FieldError("Invalid", f"{path}.requests[{key}]", str(resources["requests"][key]),
                                     f"must be equal to {key} limit of {resources['limits'][key]}"))
        elif limit is not None and request > limit:
            errors.append(FieldError("Invalid", f"{path}.requests", str(resources["requests"][key]),
                                     f"must be less than or equal to {key} limit of {resources['limits'][key]}"))
    return errors


def pod_spec_errors(spec: dict, path: str = "spec") -> list[FieldError]:
    """The pod spec checks of pkg/apis/core/validation that our manifests can meet."""
    errors: list[FieldError] = []
    volumes = spec.get("volumes") or []
    names: set[str] = set()
    for i, v in enumerate(volumes):
        name = v.get("name") or ""
        field = f"{path}.volumes[{i}].name"
        if not name:
            errors.append(FieldError("Required", field))
        errors += [FieldError("Invalid", field, name, m) for m in dns1123_label(name)] if name else []
        if name in names:
            errors.append(FieldError("Duplicate", field, name))
        names.add(name)
    if not spec.get("containers"):
        errors.append(FieldError("Required", f"{path}.containers"))
    _enum(errors, f"{path}.restartPolicy", spec.get("restartPolicy"), ("Always", "OnFailure", "Never"))
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        errors.append(FieldError("Invalid", f"{path}.activeDeadlineSeconds", spec["activeDeadlineSeconds"],
                                 "must be between 1 and 2147483647, inclusive"))
    if spec.get("serviceAccountName"):
        errors += [FieldError("Invalid", f"{path}.serviceAccountName", spec["serviceAccountName"], m)
                   for m in dns1123_subdomain(spec["serviceAccountName"])]
    for key, value in (spec.get("nodeSelector") or {}).items():
        errors += [FieldError("Invalid", f"{path}.nodeSelector", key, m) for m in qualified_name(key)]
        if not _LABEL_VALUE.fullmatch(str(value)) or len(str(value)) > 63:
            errors.append(FieldError("Invalid", f"{path}.nodeSelector", value, MSG_LABEL_VALUE))
    for i, t in enumerate(spec.get("tolerations") or []):
        field = f"{path}.tolerations[{i}]"
        if t.get("key"):
            errors += [FieldError("Invalid", f"{field}.key", t["key"], m) for m in qualified_name(t["key"])]
        elif t.get("operator") != "Exists":
            errors.append(FieldError("Invalid", f"{field}.operator", t.get("operator"),
                                     "operator must be Exists when `key` is empty, which means \"match all "
                                     "values and all keys\""))
        _enum(errors, f"{field}.operator", t.get("operator"), ("Equal", "Exists"))
        if t.get("operator") == "Exists" and t.get("value"):
            errors.append(FieldError("Invalid", f"{field}.operator", t["value"],
                                     "value must be empty when `operator` is 'Exists'"))
        _enum(errors, f"{field}.effect", t.get("effect") or None, ("NoSchedule", "PreferNoSchedule", "NoExecute"))
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            errors.append(FieldError("Invalid", f"{field}.effect", t.get("effect"),
                                     "effect must be 'NoExecute' when `tolerationSeconds` is set"))
    seccomp = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    _enum(errors, f"{path}.securityContext.seccompProfile.type", seccomp, ("Localhost", "RuntimeDefault", "Unconfined"))
    container_names: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            errors += _container_errors(c, f"{path}.{group}[{i}]", names, container_names)
    return errors


def _container_errors(c: dict, path: str, volumes: set[str], seen: set[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    name = c.get("name") or ""
    if not name:
        errors.append(FieldError("Required", f"{path}.name"))
    else:
        errors += [FieldError("Invalid", f"{path}.name", name, m) for m in dns1123_label(name)]
        if name in seen:
            errors.append(FieldError("Duplicate", f"{path}.name", name))
        seen.add(name)
    if not c.get("image"):
        errors.append(FieldError("Required", f"{path}.image"))
    _enum(errors, f"{path}.imagePullPolicy", c.get("imagePullPolicy"), ("Always", "IfNotPresent", "Never"))
    _enum(errors, f"{path}.terminationMessagePolicy", c.get("terminationMessagePolicy"),
          ("File", "FallbackToLogsOnError"))
    for i, e in enumerate(c.get("env") or []):
        env_name = e.get("name") or ""
        field = f"{path}.env[{i}].name"
        if not env_name:
            errors.append(FieldError("Required", field))
        elif "=" in env_name or not all(" " <= ch <= "~" for ch in env_name):  # RelaxedEnvironmentVariableValidation
            errors.append(FieldError("Invalid", field, env_name, "a valid environment variable name must consist "
                                     "only of printable ASCII characters other than '='"))
        source = e.get("valueFrom") or {}
        if e.get("value") and source:
            errors.append(FieldError("Invalid", f"{path}.env[{i}].valueFrom", "",
                                     "may not be specified when `value` is not empty"))
        if len([k for k in source if source[k] is not None]) > 1:
            errors.append(FieldError("Invalid", f"{path}.env[{i}].valueFrom", "",
                                     "may not have more than one field specified at a time"))
        for ref in ("secretKeyRef", "configMapKeyRef"):
            if ref in source and not (source[ref] or {}).get("key"):
                errors.append(FieldError("Required", f"{path}.env[{i}].valueFrom.{ref}.key"))
    mount_paths: set[str] = set()
    for i, m in enumerate(c.get("volumeMounts") or []):
        if m.get("name") not in volumes:
            errors.append(FieldError("NotFound", f"{path}.volumeMounts[{i}].name", m.get("name")))
        mount_path = m.get("mountPath") or ""
        if not mount_path:
            errors.append(FieldError("Required", f"{path}.volumeMounts[{i}].mountPath"))
        elif mount_path in mount_paths:
            errors.append(FieldError("Invalid", f"{path}.volumeMounts[{i}].mountPath", mount_path, "must be unique"))
        mount_paths.add(mount_path)
    errors += _resources_errors(c.get("resources") or {}, f"{path}.resources")
    sc = c.get("securityContext") or {}
    _enum(errors, f"{path}.securityContext.seccompProfile.type", (sc.get("seccompProfile") or {}).get("type"),
          ("Localhost", "RuntimeDefault", "Unconfined"))
    if sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False:
        errors.append(FieldError("Invalid", f"{path}.securityContext", sc,
                                 "cannot set `allowPrivilegeEscalation` to false and `privileged` to true"))
    return errors


def validate_core(obj: dict, field_validation: str | None, version: str = K8S_VERSION) -> list[str]:
    """Every check above for a core/v1 object being created: raises the API server's refusal, or returns the
    unknown fields it dropped (for the Warning header)."""
    dropped = check_core_schema(obj, field_validation, version)
    kind, md = obj["kind"], obj.get("metadata") or {}
    errors = metadata_errors(md, namespaced=kind != "Namespace",
                             name_check=dns1123_label if kind == "Namespace" else dns1123_subdomain)
    if kind == "Pod":
        errors += pod_spec_errors(obj.get("spec") or {})
    if errors:
        raise invalid(kind, md.get("name", ""), errors)
    return dropped


# ---- Pod Security admission (k8s.io/pod-security-admission, policy "latest") ------------------------------------

PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def _containers(spec: dict) -> Iterator[dict]:
    for group in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(group) or []


def _names(cs: list[dict]) -> str:
    quoted = ", ".join(f'"{c.get("name")}"' for c in cs)
    return ("container " if len(cs) == 1 else "containers ") + quoted


def pod_security_violations(spec: dict, level: str) -> list[str]:
    """The Pod Security Standards checks of ``level`` (baseline or restricted) that ``spec`` fails, worded as
    the admission plugin words them."""
    out: list[str] = []
    cs = list(_containers(spec))
    psc = spec.get("securityContext") or {}
    # baseline
    host = [f for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    if host:
        out.append(f"host namespaces ({', '.join(f'{f}=true' for f in host)})")
    privileged = [c for c in cs if (c.get("securityContext") or {}).get("privileged")]
    if privileged:
        out.append(f"privileged ({_names(privileged)} must not set securityContext.privileged=true)")
    added = [c for c in cs if set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])
             - _BASELINE_CAPS]
    if added:
        out.append(f"non-default capabilities ({_names(added)} must not include capabilities beyond the default "
                   "set in securityContext.capabilities.add)")
    host_path = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    if host_path:
        out.append(f"hostPath volumes (volumes {', '.join(repr(n) for n in host_path)})".replace("'", '"'))
    ports = [c for c in cs if any(p.get("hostPort") for p in c.get("ports") or [])]
    if ports:
        out.append(f"hostPort ({_names(ports)} uses hostPort)")
    unconfined = [c for c in cs if ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
                  == "Unconfined"]
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined" or unconfined:
        out.append("seccompProfile (pod or containers must not set securityContext.seccompProfile.type to "
                   "\"Unconfined\")")
    if level != "restricted":
        return out
    # restricted
    bad_volumes = [v["name"] for v in spec.get("volumes") or [] if not (set(v) - {"name"}) <= _RESTRICTED_VOLUMES]
    if bad_volumes:
        out.append(f"restricted volume types (volumes {', '.join(bad_volumes)})")
    escalation = [c for c in cs if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False]
    if escalation:
        out.append(f"allowPrivilegeEscalation != false ({_names(escalation)} must set "
                   "securityContext.allowPrivilegeEscalation=false)")
    no_drop = [c for c in cs if "ALL" not in (((c.get("securityContext") or {}).get("capabilities") or {})
                                              .get("drop") or [])]
    if no_drop:
        out.append(f"unrestricted capabilities ({_names(no_drop)} must set securityContext.capabilities.drop="
                   "[\"ALL\"])")
    pod_non_root = psc.get("runAsNonRoot") is True
    root = [c for c in cs if (c.get("securityContext") or {}).get("runAsNonRoot") is False or
            (not pod_non_root and (c.get("securityContext") or {}).get("runAsNonRoot") is not True)]
    if root:
        out.append(f"runAsNonRoot != true (pod or {_names(root)} must set securityContext.runAsNonRoot=true)")
    uid0 = psc.get("runAsUser") == 0 or any((c.get("securityContext") or {}).get("runAsUser") == 0 for c in cs)
    if uid0:
        out.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    no_seccomp = [c for c in cs if ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
                  not in ("RuntimeDefault", "Localhost") and not pod_seccomp]
    if no_seccomp:
        out.append(f"seccompProfile (pod or {_names(no_seccomp)} must set securityContext.seccompProfile.type to "
                   "\"RuntimeDefault\" or \"Localhost\")")
    return out


def check_pod_security(pod: dict, namespace_labels: dict) -> None:
    """Pod Security admission in enforce mode for the pod's namespace: 403 with every violation."""
    level = namespace_labels.get(PSA_ENFORCE)
    if level not in ("baseline", "restricted"):
        return
    violations = pod_security_violations(pod.get("spec") or {}, level)
    if violations:
        name = pod["metadata"].get("name", "")
        raise ApiError(403, f'pods "{name}" is forbidden: violates PodSecurity "{level}:latest": '
                            + ", ".join(violations), reason="Forbidden", name=name, kind="pods")


# ---- custom resources: the CRD's structural schema and its CEL rules ---------------------------------------------

def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", list: "array"}.get(
        type(value), "null")


def _type_ok(value: Any, schema: dict) -> bool:
    if value is None:
        return bool(schema.get("nullable"))
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    kind = schema.get("type")
    return {None: True, "object": isinstance(value, dict), "array": isinstance(value, list),
            "string": isinstance(value, str), "boolean": isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind, True)


def check_structural(value: Any, schema: dict, path: list, errors: list[FieldError], unknown: list[list],
                     rules: list[tuple[list, dict, Any]]) -> None:
    """Walk ``value`` along a CRD's structural schema: collect unknown fields (pruned by the caller), the
    OpenAPI value errors the API server reports, and the CEL rules to evaluate (with the value they apply to)."""
    field = _path(path)
    if not _type_ok(value, schema):
        want = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        errors.append(FieldError("Invalid", field, _json_type(value), f"{field} in body must be of type {want}: "
                                 f'"{_json_type(value)}"'))
        return
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(FieldError("NotSupported", field, value,
                                 "supported values: " + ", ".join(json.dumps(e) for e in schema["enum"])))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(FieldError("Invalid", field, value,
                                     f"{field} in body should be greater than or equal to {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(FieldError("Invalid", field, value,
                                     f"{field} in body should be less than or equal to {schema['maximum']}"))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError("TooLong", field, value, f"may not be more than {schema['maxLength']} bytes"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(FieldError("Invalid", field, value,
                                     f"{field} in body should be at least {schema['minLength']} chars long"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(FieldError("Invalid", field, value,
                                     f"{field} in body should match '{schema['pattern']}'"))
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError("Invalid", field, "array", f"must have at most {schema['maxItems']} items"))
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError("Invalid", field, value,
                                     f"{field} in body should have at least {schema['minItems']} items"))
        for i, item in enumerate(value):
            check_structural(item, schema.get("items") or {}, path + [i], errors, unknown, rules)
    if isinstance(value, dict):
        for key in schema.get("required") or []:
            if key not in value:
                errors.append(FieldError("Required", _path(path + [key])))
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                check_structural(item, props[key], path + [key], errors, unknown, rules)
            elif isinstance(extra, dict):
                check_structural(item, extra, path + [key], errors, unknown, rules)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                unknown.append(path + [key])
            elif props is None and extra is None and not schema.get("x-kubernetes-preserve-unknown-fields") and \
                    schema.get("type") == "object" and path and path[-1] != "metadata":
                unknown.append(path + [key])
    for rule in schema.get("x-kubernetes-validations") or []:
        rules.append((path, rule, value))


@functools.lru_cache(maxsize=None)
def _cel_program(rule: str) -> Any:
    import celpy  # cel-python evaluates the CEL rules of a CRD's x-kubernetes-validations
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(rules: list[tuple[list, dict, Any]], old: dict | None = None) -> list[FieldError]:
    """Evaluate each rule on its value. Transition rules (those that read oldSelf) run only on updates, and only
    where the field existed before, as the API server does; ``old`` is the object before the update. A rule that
    does not evaluate to true (false, or an error such as no matching overload) fails."""
    import celpy
    errors = []
    missing = object()
    for path, rule, value in rules:
        variables = {"self": celpy.json_to_cel(value)}
        if "oldSelf" in rule["rule"]:
            before: Any = old if old is not None else missing
            for part in path:
                try:
                    before = before[part]
                except (KeyError, IndexError, TypeError):
                    before = missing
                    break
            if before is missing:
                continue
            variables["oldSelf"] = celpy.json_to_cel(before)
        try:
            result = _cel_program(rule["rule"]).evaluate(variables)
            ok = isinstance(result, celpy.celtypes.BoolType) and bool(result)
        except celpy.CELEvalError:
            ok = False
        if not ok:
            shown = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else value
            errors.append(FieldError("Invalid", _path(path) or "<nil>", shown,
                                     rule.get("message") or f"failed rule: {rule['rule']}"))
    return errors


def validate_custom(obj: dict, schema: dict, *, kind: str, group: str, plural: str,
                    field_validation: str | None, old: dict | None = None) -> list[str]:
    """A custom resource being created, or updated from ``old``: raises the API server's refusal (400 under
    Strict for unknown fields; 422 for wrong types, schema values and CEL rules, transition rules included on
    updates), or prunes unknown fields and returns their paths."""
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    errors: list[FieldError] = []
    unknown: list[list] = []
    rules: list[tuple[list, dict, Any]] = []
    props = schema.get("properties") or {}
    for key, value in body.items():
        if key in props:
            check_structural(value, props[key], [key], errors, unknown, rules)
        else:
            unknown.append([key])
    name = (obj.get("metadata") or {}).get("name", "")
    errors += metadata_errors(obj.get("metadata") or {})
    type_errors = [e for e in errors if e.type == "Invalid" and "must be of type" in e.detail]
    if type_errors:
        raise invalid(kind, name, type_errors, group, plural)
    paths = [_path(p) for p in unknown]
    if paths and field_validation == "Strict":
        raise strict_refusal(kind, obj.get("apiVersion", "").split("/")[-1], paths)
    for parts in sorted(unknown, key=len, reverse=True):
        _delete(obj, parts)
    for rule in schema.get("x-kubernetes-validations") or []:  # rules on the whole object (metadata.name ...)
        rules.append(([], rule, obj))
    errors += cel_errors(rules, old)
    if errors:
        raise invalid(kind, name, errors, group, plural)
    return paths if field_validation != "Ignore" else []
