# bidsdl: `make demo` runs the tool on generated sample data; `make test` runs lint and the tests.
# `make benchmark` prints speed, memory and accuracy figures (installs antspyx for the comparison).
# Both create the virtual environment (.venv) on first use; nothing else needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_SUBJECTS ?= 16
PYTEST_ARGS ?=

.PHONY: install demo test lint benchmark clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the constraints file keeps pip from pulling CUDA builds.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -f $(DEMO_DIR)/bids/dataset_description.json || \
		$(BIN)/bidsdl-sample $(DEMO_DIR)/bids --subjects $(DEMO_SUBJECTS) --seed 42 --duplicate-subject
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives participant -w $(DEMO_DIR)/work
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives group -w $(DEMO_DIR)/work \
		--target diagnosis --positive-class AD --n-folds 3
	@echo
	@echo "Sample dataset:   $(abspath $(DEMO_DIR))/bids"
	@echo "Derivatives:      $(abspath $(DEMO_DIR))/derivatives"
	@echo "Manifest:         $(abspath $(DEMO_DIR))/derivatives/manifest.tsv"
	@echo "Quality metrics:  $(abspath $(DEMO_DIR))/derivatives/qc.tsv"
	@echo "Group report:     $(abspath $(DEMO_DIR))/derivatives/group.html"
	@echo "Model package:    $$(ls -d $(abspath $(DEMO_DIR))/derivatives/models/*/ | head -1)"
	@echo "Subject reports:"
	@for report in $(abspath $(DEMO_DIR))/derivatives/sub-*.html; do echo "  $$report"; done
	@echo "Logs and configs: $(abspath $(DEMO_DIR))/derivatives/logs/"

lint: install
	$(BIN)/ruff check pipeline tests benchmarks templates
	$(BIN)/mypy pipeline

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

benchmark: install
	$(BIN)/pip install --quiet -c constraints.txt ".[benchmark]"
	$(BIN)/python benchmarks/sample_dataset.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build *.egg-info
