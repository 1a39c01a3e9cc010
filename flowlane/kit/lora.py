"""A LoRA checkpoint made into a full model directory, and what identifies a base model.

Serving a LoRA run's checkpoint, evaluating it, or loading it into an engine needs full weights:
the run's base model with the adapter merged in. The learner writes those checkpoints and the
rollout side reads them, so the merge lives here, below both. A merge is refused when the base
model on this machine is not the one the adapter was trained on (``weights_identity``: architecture
numbers plus a digest of the embeddings, recorded in the checkpoint's learner state).

Weight sync is the other way round: a LoRA run on vLLM sends its rollout engines the adapter
alone (``adapter_config.json`` + its lora_A / lora_B tensors, PEFT's format), which vLLM serves on
top of the base model it already holds; the adapter directory helpers below are shared by the
learner (publishing), the weights store and the engine (staging it for vLLM).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# torch at module level: this module exists for weight work, and only weight-loading code imports it.
import torch

from flowlane.api.errors import FlowlaneError

#: The learner's own record in a checkpoint directory (config, base model identity, counters).
STATE_FILE = "learner_state.json"
# Files copied from the base model directory so a checkpoint is a complete model directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def weights_identity(model: Any) -> dict[str, Any]:
    """What makes a base model *this* model: architecture numbers plus a digest of its embeddings."""
    config = model.config
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    identity: dict[str, Any] = {key: getattr(config, key, None) for key in keys}
    identity["architectures"] = list(getattr(config, "architectures", None) or [type(model).__name__])
    embedding = model.get_input_embeddings().weight.detach()
    sample = embedding[: min(8, embedding.shape[0])].to(torch.float32).contiguous().cpu()
    identity["embedding_sha256"] = hashlib.sha256(sample.numpy().tobytes()).hexdigest()
    return identity


def describe_identity(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('model_type')} with {identity.get('num_hidden_layers')} layers, hidden "
        f"{identity.get('hidden_size')}, vocab {identity.get('vocab_size')}"
    )


def merge_lora_checkpoint(checkpoint_dir: Path, out_dir: Path) -> None:
    """Write a full model directory (float32 safetensors, config, tokenizer) into ``out_dir`` from
    a LoRA checkpoint: the run's base model (its ``model_path``, resolved on this machine) with the
    adapter merged in, so that any engine loads it. Refuses a base that is not the one trained on."""
    from peft import PeftModel  # heavy, and needed only here
    from transformers import AutoModelForCausalLM

    from flowlane.kit.models import resolve_model  # kit.models imports this module lazily

    try:
        meta = json.loads((checkpoint_dir / STATE_FILE).read_text())
        model_path, recorded = meta["config"]["model_path"], dict(meta["base_model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FlowlaneError(f"{checkpoint_dir} is not a readable LoRA checkpoint ({STATE_FILE}: {err})") from None
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(model_path)), dtype=torch.float32)
    theirs = {k: v for k, v in recorded.items() if k != "path"}
    if weights_identity(base) != theirs:
        here = describe_identity(weights_identity(base))
        raise FlowlaneError(f"the LoRA checkpoint {checkpoint_dir} was trained on {describe_identity(theirs)}, but "
                            f"{model_path!r} here is {here}; install the same base model")
    merged = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copy2(checkpoint_dir / name, out_dir / name)


# -- adapter-only weight sync --------------------------------------------------------------------

#: The two files of a PEFT adapter directory (what ``PeftModel.from_pretrained`` and vLLM's
#: ``LoRARequest`` load): the adapter's config and its lora_A / lora_B tensors.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config_text(peft_config: Any) -> str:
    """A PEFT ``LoraConfig`` as the JSON text of its ``adapter_config.json`` (sets become sorted lists)."""
    config = peft_config.to_dict()
    return json.dumps({key: sorted(value) if isinstance(value, set) else value for key, value in config.items()},
                      indent=2, sort_keys=True)


def adapter_rank(config_text: str) -> int:
    """The rank ``r`` an ``adapter_config.json`` declares; FlowlaneError when it is not a LoRA config."""
    try:
        config = json.loads(config_text)
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as err:
        raise FlowlaneError(f"{ADAPTER_CONFIG_FILE} is not a LoRA adapter config "
                            f"({type(err).__name__}: {err})") from None
    if config.get("peft_type", "LORA") != "LORA" or rank < 1:
        raise FlowlaneError(f"{ADAPTER_CONFIG_FILE} is not a LoRA adapter config (peft_type "
                            f"{config.get('peft_type')!r}, r {rank})")
    return rank


def write_adapter(directory: Path, config_text: str, tensors: Any) -> int:
    """Write a PEFT adapter directory (config + one safetensors file); returns the tensors' bytes.

    ``tensors``: (name, tensor) pairs under PEFT's names (``base_model.model.<module>.lora_A.weight``).
    """
    from safetensors.torch import save_file

    adapter_rank(config_text)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors}
    if not state:
        raise FlowlaneError("a LoRA adapter needs at least one tensor; got none")
    not_lora = [name for name in state if ".lora_" not in name]
    if not_lora:
        raise FlowlaneError(f"adapter tensor {not_lora[0]!r} is not a LoRA weight (lora_A / lora_B); "
                            "full model weights go through load_weights")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS_FILE))
    (directory / ADAPTER_CONFIG_FILE).write_text(config_text)
    return sum(t.numel() * t.element_size() for t in state.values())


def read_adapter(directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The config text and tensors of a PEFT adapter directory written by ``write_adapter``."""
    from safetensors.torch import load_file

    config_text = (directory / ADAPTER_CONFIG_FILE).read_text()
    adapter_rank(config_text)
    return config_text, load_file(str(directory / ADAPTER_WEIGHTS_FILE))
