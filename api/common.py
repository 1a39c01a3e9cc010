"""Building blocks shared by the FlowRun and FlowService models.

Both resources are written by people in YAML, read by the operator from the Kubernetes API, and
turned into a CRD schema. That gives the models three jobs at once, and this module holds what
makes them do all three the same way:

- ``SpecModel``: camelCase names in YAML, snake_case in Python, unknown fields rejected, and every
  field declared with its description, default and validation in place (the CRD generator reads
  exactly these declarations, so nothing is written twice).
- Small Kubernetes-flavoured types (``Quantity``, ``Toleration``, ``Resources``, secret references,
  ``Condition``) whose JSON schema is already structural.
- Error reporting: pydantic's errors become one line per problem, each starting with the field path
  a user sees in their YAML (``spec.rollout.replicas: must be >= 1, got 0``), and cross-field checks
  raise ``field_error`` so they read the same way.
- ``load_resource``: parse YAML text or a file into a model and raise one ``ConfigError`` listing
  every problem.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from flowlane.api.errors import ConfigError

API_GROUP: Final = "flowlane.dev"
API_VERSION: Final = "v1alpha1"
# Written out rather than formatted: a Final literal is what the resources' ``apiVersion: Literal[...]``
# fields accept as their default.
GROUP_VERSION: Final = "flowlane.dev/v1alpha1"
assert f"{API_GROUP}/{API_VERSION}" == GROUP_VERSION

# Kubernetes' own quantity grammar ("500m", "2", "1.5Gi", "1e3").
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# RFC 1035 label: what a Service name must be. Child objects are named after their resource.
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# RFC 1123 subdomain: what a Secret or ConfigMap name must be.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
STORAGE_URI_PATTERN = r"^(file|s3)://.+$"
HTTP_URL_PATTERN = r"^https?://.+$"
TOOL_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class SpecModel(BaseModel):
    """Base of every spec/status model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def to_data(self) -> dict[str, Any]:
        """Plain JSON-compatible data with YAML names, omitting unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _quantity_to_str(value: Any) -> Any:
    # YAML turns `cpu: 2` into an int and `cpu: 0.5` into a float; Kubernetes accepts both.
    if isinstance(value, bool):
        return value  # rejected by the pattern check below
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity ("500m", "2", "8Gi"); numbers are accepted and kept as text."""


class TolerationOperator(enum.StrEnum):
    EQUAL = "Equal"
    EXISTS = "Exists"


class TaintEffect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    """A pod toleration, as in the Kubernetes Pod spec (for GPU or dedicated-node taints)."""

    key: str | None = Field(None, description="Taint key the toleration matches; empty matches all keys.")
    operator: TolerationOperator = Field(
        TolerationOperator.EQUAL, description="Equal (key and value must match) or Exists (any value)."
    )
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: TaintEffect | None = Field(None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Resources(SpecModel):
    """Compute for one replica of a component: CPU, memory, GPUs and where it may be scheduled."""

    cpu: Quantity = Field("1", description="CPU request and limit per replica (Kubernetes quantity).")
    memory: Quantity = Field("2Gi", description="Memory request and limit per replica (Kubernetes quantity).")
    gpu: int = Field(0, ge=0, le=16, description="NVIDIA GPUs per replica (nvidia.com/gpu); 0 runs on CPU.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the replica's pod must match (e.g. a GPU node pool)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the replica's pod tolerates (e.g. nvidia.com/gpu)."
    )
    image: str | None = Field(
        None, min_length=1, description="Container image override; default: the operator's image for the role."
    )


#: Label and annotation key prefixes the operator owns: its selectors and bookkeeping rely on them.
RESERVED_KEY_PREFIXES: Final = ("flowlane.dev/", "app.kubernetes.io/")
#: A label or annotation key: an optional DNS-subdomain prefix and a name of up to 63 characters.
METADATA_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


class PodTemplate(SpecModel):
    """Pod metadata and scheduling that pass through to every pod of the resource, unchanged.

    What a platform needs of its pods that flowlane has no opinion on: a Kueue queue
    (label ``kueue.x-k8s.io/queue-name``), a cost-centre label, a priority class, a custom
    scheduler, a service account for workload identity, pull secrets for a private registry.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.labels) || self.labels.all(k, !k.startsWith('flowlane.dev/') && "
                 "!k.startsWith('app.kubernetes.io/'))",
         "message": "label keys under flowlane.dev/ and app.kubernetes.io/ belong to the operator",
         "fieldPath": ".labels"},
        {"rule": "!has(self.annotations) || self.annotations.all(k, !k.startsWith('flowlane.dev/'))",
         "message": "annotation keys under flowlane.dev/ belong to the operator", "fieldPath": ".annotations"},
    ]})

    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels added to every pod; keys under flowlane.dev/ and "
        "app.kubernetes.io/ are the operator's.")
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations added to every pod; keys under flowlane.dev/ are the operator's.")
    priority_class_name: ObjectName | None = Field(None, description="PriorityClass of every pod.")
    scheduler_name: ObjectName | None = Field(None, description="Scheduler of every pod; default: the cluster's.")
    service_account_name: ObjectName | None = Field(
        None, description="ServiceAccount the pods run as (its API token is still not mounted); default: "
        "the namespace's default.")
    image_pull_secrets: list[ObjectName] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the images, added to the "
        "operator's own (the chart's imagePullSecrets).")

    @field_validator("labels")
    @classmethod
    def _own_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            _check_metadata_key(key)
            if key.startswith(RESERVED_KEY_PREFIXES):
                raise field_error(key, "label keys under flowlane.dev/ and app.kubernetes.io/ belong to the "
                                  "operator; choose another prefix")
            if len(value) > 63 or not re.match(LABEL_VALUE_PATTERN, value):
                raise field_error(key, f"a label value is at most 63 letters, digits, '-', '_' and '.', starting "
                                  f"and ending with a letter or digit, got {value!r}")
        return labels

    @field_validator("annotations")
    @classmethod
    def _own_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            _check_metadata_key(key)
            if key.startswith(RESERVED_KEY_PREFIXES[0]):
                raise field_error(key, "annotation keys under flowlane.dev/ belong to the operator; "
                                  "choose another prefix")
        return annotations


def _check_metadata_key(key: str) -> None:
    if len(key) > 317 or not re.match(METADATA_KEY_PATTERN, key):
        raise field_error(key, "not a label or annotation key: an optional DNS-subdomain prefix and '/', then "
                          "up to 63 letters, digits, '-', '_' and '.'")


class SecretKeyRef(SpecModel):
    """One key of a Kubernetes Secret in the resource's namespace."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                      description="Name of the Secret.")
    key: str = Field("token", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN,
                     description="Key inside the Secret.")


class S3CredentialsSecret(SpecModel):
    """A Secret holding S3 access keys (MinIO or any S3 endpoint)."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                      description="Name of the Secret with the S3 access keys.")
    access_key_key: str = Field("accessKey", pattern=SECRET_KEY_PATTERN,
                                description="Key of the access key id inside the Secret.")
    secret_key_key: str = Field("secretKey", pattern=SECRET_KEY_PATTERN,
                                description="Key of the secret access key inside the Secret.")


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(SpecModel):
    """One observation about the resource, in the standard Kubernetes condition shape."""

    type: str = Field(..., min_length=1, max_length=316, description="Condition type, e.g. Ready or Failed.")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN,
                        description="Machine-readable CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details; says what to do.")
    last_transition_time: datetime = Field(..., description="When the status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed for."
    )


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus | bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; its transition time moves only when status flips."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        moved = cond.status != status
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             last_transition_time=now if moved else cond.last_transition_time,
                             observed_generation=generation))
    if not found:
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             last_transition_time=now, observed_generation=generation))
    return out


def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def utcnow() -> datetime:
    """Now, in UTC, truncated to seconds (Kubernetes timestamps have second precision)."""
    return datetime.now(UTC).replace(microsecond=0)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata flowlane reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True, alias_generator=to_camel)

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN,
                      description="Name of the resource; children are named after it.")
    namespace: str | None = Field(None, description="Namespace of the resource.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


# -- errors with field paths -------------------------------------------------------------------

def field_error(path: str, message: str) -> PydanticCustomError:
    """An error for a cross-field check, raised from a model validator.

    ``path`` is relative to the model raising it (``"checkpointInterval"``); the loader prefixes the
    model's own location so the user sees ``spec.schedule.checkpointInterval: ...``.
    """
    return PydanticCustomError("flowlane_field", "{path}: {detail}", {"path": path, "detail": message})


#: Human names for the patterns fields use, so errors say what is expected instead of a regex.
PATTERN_NAMES: dict[str, str] = {
    QUANTITY_PATTERN: "a Kubernetes quantity such as 500m, 2 or 8Gi",
    DNS_LABEL_PATTERN: "a DNS label (lowercase letters, digits and '-', starting with a letter)",
    DNS_SUBDOMAIN_PATTERN: "a DNS subdomain name (lowercase letters, digits, '-' and '.')",
    SECRET_KEY_PATTERN: "a Secret key (letters, digits, '-', '_' and '.')",
    CONDITION_REASON_PATTERN: "a CamelCase reason",
    STORAGE_URI_PATTERN: "a file:// or s3:// URI (file:///abs/path, s3://bucket/prefix)",
    HTTP_URL_PATTERN: "an http:// or https:// URL",
    TOOL_NAME_PATTERN: "a tool name (lowercase letters, digits and '_', starting with a letter)",
}


def format_loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc`` (for suggesting known field names)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def describe_error(err: Any, root: type[BaseModel] | None = None) -> str:
    """One pydantic error as ``path: what is wrong, got what``."""
    loc = tuple(err.get("loc", ()))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "flowlane_field":
        rel = [int(p) if p.isdigit() else p for p in str(ctx["path"]).split(".")]
        path = format_loc((*loc, *rel))
        return f"{path}: {ctx['detail']}"
    path = format_loc(loc) or "(top level)"
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1]) if root is not None else None
        hint = ""
        if parent is not None:
            known = _field_names(parent)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(known)}"
        return f"{path}: unknown field{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    bounds = {
        "greater_than_equal": ("must be >= {ge}", "ge"),
        "greater_than": ("must be > {gt}", "gt"),
        "less_than_equal": ("must be <= {le}", "le"),
        "less_than": ("must be < {lt}", "lt"),
    }
    if kind in bounds:
        template, _ = bounds[kind]
        return f"{path}: {template.format(**ctx)}, got {_short(got)}"
    if kind in ("enum", "literal_error"):
        return f"{path}: must be one of {ctx.get('expected', '?')}, got {_short(got)}"
    if kind == "string_pattern_mismatch":
        wanted = PATTERN_NAMES.get(str(ctx.get("pattern")), f"match the pattern {ctx.get('pattern')}")
        return f"{path}: must be {wanted}, got {_short(got)}"
    if kind in ("string_too_short", "too_short"):
        return f"{path}: must have at least {ctx.get('min_length')} characters/items, got {_short(got)}"
    if kind in ("string_too_long", "too_long"):
        return f"{path}: must have at most {ctx.get('max_length')} characters/items, got {_short(got)}"
    if kind == "value_error":
        return f"{path}: {ctx.get('error', err.get('msg'))}"
    simple = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
        "bool_parsing": "true or false", "string_type": "a string", "dict_type": "a mapping",
        "model_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
        "datetime_type": "an RFC 3339 time", "datetime_parsing": "an RFC 3339 time",
        "datetime_from_date_parsing": "an RFC 3339 time",
    }
    if kind in simple:
        return f"{path}: must be {simple[kind]}, got {_short(got)}"
    return f"{path}: {err.get('msg', kind)}"


def describe_validation_error(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    return [describe_error(e, root) for e in exc.errors(include_url=False)]


M = TypeVar("M", bound=BaseModel)


def read_yaml_document(source: str | Path, kind: str) -> tuple[dict[str, Any], str]:
    """Read one YAML mapping from a path or from YAML text; return it and a label for messages."""
    label = "<text>"
    text: str
    if isinstance(source, Path) or ("\n" not in source and source.strip().endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; pass the path of a {kind} YAML file")
        label = str(path)
        text = path.read_text(encoding="utf-8")
    else:
        text = source
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{label}:{where}: not valid YAML ({problem})") from None
    matching = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    if len(docs) == 1 and isinstance(docs[0], dict):
        return docs[0], label
    if len(matching) == 1:
        return matching[0], label
    if not docs:
        raise ConfigError(f"{label}: empty document; expected a {kind} resource")
    raise ConfigError(
        f"{label}: expected exactly one {kind} document, found {len(matching)} among {len(docs)} documents"
    )


class InvalidResourceError(ConfigError):
    """A resource that failed validation; ``problems`` holds one ``path: what is wrong`` per error."""

    def __init__(self, label: str, kind: str, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} error{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{label}: invalid {kind} ({count}): " + "; ".join(problems))


def validate_resource(model: type[M], data: Any, kind: str, label: str = "<object>") -> M:
    """Validate already-parsed data into ``model``; ``InvalidResourceError`` lists every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidResourceError(label, kind, describe_validation_error(exc, model)) from None


def load_resource(model: type[M], source: str | Path, kind: str) -> M:
    """Validate a YAML resource into ``model``; a ``ConfigError`` lists every problem with its path."""
    data, label = read_yaml_document(source, kind)
    return validate_resource(model, data, kind, label)
