"""Session-wide test setup.

Heavy fixtures (a vLLM engine, an S3 server, an MLflow server, KMock) start once per session and
live in the ``fixtures_*`` plugin modules beside this file, one per area.
"""

import os

import pytest

# Keep the CPU engines small and deterministic on 2-core machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "fixtures_models",
    "fixtures_services",
    "fixtures_kube",
    "fixtures_cluster",
]


# Fixtures that start a vLLM engine: a test that needs one, directly or through another fixture
# (the gateway's), is a `vllm` test, so `make test-fast` skips it without a mark to remember.
VLLM_FIXTURES = frozenset({"vllm_engine", "lora_engine"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if VLLM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)
    # In one session the one-machine cluster's modules run first: their pods (engines, learners, the
    # S3 server's buffers) took up to 17.3 GiB of a 24 GiB machine in CI, and the session's vLLM
    # engine, started by the first test that needs it, would otherwise already hold ~3 GiB beside
    # them. (`make test` runs them in a session of their own, after the rest: scripts/test.sh.) The
    # sort is stable, so each module's tests stay together and in order.
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)
