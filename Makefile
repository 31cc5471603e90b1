# Set up a virtualenv and run the demo, the checks (lint) or the tests. torch is pinned here only,
# to the CPU build that the project is developed against; the package itself declares torch>=2.11,
# the oldest release the whole suite passes on (README: "Tested on").
# The set-up hides setuptools' boxed notice that an editable install is one (it says nothing
# about this project).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo lint docs test test-quick test-long bench clean

$(BIN)/.installed: pyproject.toml
	@echo "setting up $(VENV): $(TORCH) and functrain with its extras (about 3 minutes, once)"
	@start=$$(date +%s) && \
	$(PY) -m venv $(VENV) && \
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip && \
	echo "  torch ..." && $(BIN)/pip install -q $(TORCH) && \
	echo "  functrain and its extras ..." && \
	PYTHONWARNINGS="ignore:Editable installation" \
	$(BIN)/pip install -q -e '.[dev,demo,config,data,wandb,optuna,docs]' $(TORCH) && \
	echo "set up in $$(( $$(date +%s) - start )) s"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/functrain run configs/demo.yaml $(ARGS)

# the checks CI runs before the tests: format, lint, types, the import contract (layers, no
# cycles, no private names across modules: tools/import_contract.py)
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tools/import_contract.py

# the documentation site, from docs/ into site/; --strict: any warning (a broken link, an unresolved
# reference, a docstring griffe cannot parse) fails the build
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# on every core (pytest-xdist); the tests that launch process groups run on one worker, one at a
# time (their xdist_group); one line per test file as it finishes
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# the inner loop: every test but those that launch process groups or fresh processes, the
# notebooks, and compiled steps (all in make test)
QUICK_SKIP := tests/distributed tests/test_notebooks.py tests/checkpoint/test_sharded_checkpoints.py \
	tests/checkpoint/test_manager_processes.py tests/checkpoint/test_fault_injection.py \
	tests/driver/test_loader_resume.py tests/core/test_compile.py tests/core/test_capture.py \
	property_tests/test_fit_resumption.py property_tests/test_resumption.py

test-quick: setup
	$(BIN)/python -m pytest -q -n auto --dist loadgroup $(addprefix --ignore=,$(QUICK_SKIP))

test-long: setup
	FUNCTRAIN_LONG_TESTS=1 HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/optim_update.py
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/checkpoint_io.py
	$(BIN)/python benchmarks/driver_overhead.py
	$(BIN)/python benchmarks/distributed_step.py
	$(BIN)/python benchmarks/ensemble.py
	$(BIN)/python benchmarks/layout_checks.py
	$(BIN)/python benchmarks/data_resume.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .cache build site *.egg-info
