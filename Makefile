# bidsdl: `make demo` runs the tool on generated sample data; `make test` runs lint and the tests.
# `make benchmark` prints speed, memory and accuracy figures.
# Both create the virtual environment (.venv) on first use; nothing else needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_SUBJECTS ?= 12
DEMO_NEW_SUBJECTS ?= 5
DEMO_SEG_EPOCHS ?= 10
DEMO_SEG_PATCH ?= 48
DEMO_LESION_EPOCHS ?= 10
DEMO_NESTED_EPOCHS ?= 10
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (`--dist loadscope`: tests/conftest.py keeps the modules of one shared sample on
# one worker)
PYTEST_WORKERS ?= 2
# the T1w study's model package (step 2), as its results.json names it
T1W_PACKAGE = $(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['package'])" \
	$(DEMO_DIR)/derivatives/learn/target-diagnosis/arch-conv5fc3/results.json

.PHONY: install demo test test-infra lint benchmark clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the constraints file keeps pip from pulling CUDA builds.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,export]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -f $(DEMO_DIR)/bids/dataset_description.json || \
		$(BIN)/bidsdl-sample $(DEMO_DIR)/bids --subjects $(DEMO_SUBJECTS) --seed 42 --duplicate-subject \
			--flair-fraction 1 --lesion-fraction 0.7
	@test -f $(DEMO_DIR)/new/dataset_description.json || \
		$(BIN)/bidsdl-sample $(DEMO_DIR)/new --subjects $(DEMO_NEW_SUBJECTS) --seed 7 --label-prefix ext \
			--flair-fraction 1 --lesion-fraction 1 --unfamiliar scanner
	# 0. plan: one participant (the heaviest) measured in a scratch folder; SLURM scripts sized from it in plan/
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives participant -w $(DEMO_DIR)/work \
		--lesion-masks $(DEMO_DIR)/bids/derivatives/lesions --plan
	# 1. preprocess the training cohort (each T1w, its session's FLAIR aligned to it, lesion masks left out of the
	#    registrations); 2. train and evaluate (group level)
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives participant -w $(DEMO_DIR)/work \
		--lesion-masks $(DEMO_DIR)/bids/derivatives/lesions
	#    (the T1w intensities and one held-out test set here: the defaults below 300 participants are step 2b's
	#    morphometry maps and nested cross-validation)
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives group -w $(DEMO_DIR)/work \
		--target diagnosis --positive-class AD --n-folds 3 --outer-folds 0 --inputs T1w
	# 2b. morphometry (modulated grey matter and the log-Jacobian of the nonlinear registration) with every
	#     participant tested once (nested cross-validation), beside the regional volumes' linear model, its learning
	#     curve, and the model for later use trained on everyone
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives group -w $(DEMO_DIR)/work \
		--target diagnosis --positive-class AD --inputs GM logjacobian --outer-folds 3 --n-folds 2 --epochs $(DEMO_NESTED_EPOCHS)
	# 3. predict new subjects (participant --model); 4. evaluate the model on them (group --model); 5. export
	model=$(DEMO_DIR)/derivatives/$$($(T1W_PACKAGE)) && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_derivatives participant -w $(DEMO_DIR)/work_new --model $$model && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_derivatives group -w $(DEMO_DIR)/work_new --model $$model && \
	$(BIN)/bidsdl-export $$model --format torchscript -o $(DEMO_DIR)/exported/model.pt && \
	$(BIN)/bidsdl-export $$model --format onnx -o $(DEMO_DIR)/exported/model.onnx
	# 6. segmentation: learn the sample's labelled structures (group), segment the new cohort (participant),
	#    compare with its reference labels (group --model --labels), export one window
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives group -w $(DEMO_DIR)/work --task segmentation \
		--labels $(DEMO_DIR)/bids/derivatives/labels --label-desc structures --n-folds 1 --epochs $(DEMO_SEG_EPOCHS) --patch-size $(DEMO_SEG_PATCH)
	segmodel=$$(ls -td $(DEMO_DIR)/derivatives/models/structures_*/ | head -1) && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_segmentation participant -w $(DEMO_DIR)/work_new --model $$segmodel && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_segmentation group -w $(DEMO_DIR)/work_new --model $$segmodel \
		--labels $(DEMO_DIR)/new/derivatives/labels --label-desc structures && \
	$(BIN)/bidsdl-export $$segmodel --format onnx -o $(DEMO_DIR)/exported/segmentation.onnx
	# 7. lesions: a two-channel model (T1w + FLAIR) learns the lesion masks (group), labels the new people's lesions
	#    (participant), is scored lesion-wise against their masks (group --model --labels)
	$(BIN)/bidsdl $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives group -w $(DEMO_DIR)/work --task segmentation \
		--labels $(DEMO_DIR)/bids/derivatives/lesions --label-desc lesion --inputs T1w FLAIR --n-folds 1 \
		--epochs $(DEMO_LESION_EPOCHS) --patch-size $(DEMO_SEG_PATCH)
	lesionmodel=$$(ls -td $(DEMO_DIR)/derivatives/models/lesion_*/ | head -1) && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_lesions participant -w $(DEMO_DIR)/work_new --model $$lesionmodel && \
	$(BIN)/bidsdl $(DEMO_DIR)/new $(DEMO_DIR)/new_lesions group -w $(DEMO_DIR)/work_new --model $$lesionmodel \
		--labels $(DEMO_DIR)/new/derivatives/lesions --label-desc lesion
	@echo
	@echo "Training cohort:      $(abspath $(DEMO_DIR))/bids"
	@echo "Its derivatives:      $(abspath $(DEMO_DIR))/derivatives (manifest.tsv, qc.tsv, logs/)"
	@echo "Group report:         $(abspath $(DEMO_DIR))/derivatives/group.html"
	@echo "Model package:        $(abspath $(DEMO_DIR))/derivatives/$$($(T1W_PACKAGE)) (T1w)"
	@echo "Methods text:         $(abspath $(DEMO_DIR))/derivatives/learn/target-diagnosis/arch-conv5fc3/methods.md (each study's, with references.bib; group.html and each subject report: Methods)"
	@$(BIN)/python -c "import json,sys; print('Plan (SLURM scripts):', sys.argv[1].rsplit('/', 1)[0] + '/:', \
		json.load(open(sys.argv[1]))['summary'])" $(abspath $(DEMO_DIR))/derivatives/plan/participant.json
	@echo "New cohort:           $(abspath $(DEMO_DIR))/new"
	@$(BIN)/python -c "import json,sys; r=json.load(open(sys.argv[1])); print('Deep vs linear:      ', \
		r['baseline']['verdict']['text'])" $(DEMO_DIR)/derivatives/learn/target-diagnosis/arch-conv5fc3/results.json
	@$(BIN)/python -c "import json,sys; r=json.load(open(sys.argv[1])); n=r['nested']; t=r['test']; \
		print('Morphometry, nested:  ', n['n_tested'], 'participants each tested once: ROC-AUC', \
		round(t['metrics']['roc_auc'], 3), '| vs volumes:', (r.get('volumes_baseline') or {}).get('verdict', {}).get('text', 'n/a')); \
		print('  more participants?  ', (r['baseline'].get('learning_curve_outlook') or {}).get('text', 'n/a')); \
		print('  model for later use:', r['package'], '(trained on everyone)')" \
		$(DEMO_DIR)/derivatives/learn/target-diagnosis/arch-conv5fc3_inputs-GM+logjacobian/results.json
	@echo "External evaluation:  $(abspath $(DEMO_DIR))/new_derivatives/group.html (predictions.tsv beside it)"
	@$(BIN)/python -c "import json,sys; r=json.load(open(sys.argv[1])); f=r['out_of_distribution']; \
		print('Out of distribution: ', ', '.join(o['source'] for o in f) or 'none flagged', '|', \
		(r.get('by_distribution') or {}).get('text', ''))" $(DEMO_DIR)/new_derivatives/external_evaluation.json
	@echo "Exported models:      $(abspath $(DEMO_DIR))/exported/"
	@echo "Segmentation model:   $$(ls -td $(abspath $(DEMO_DIR))/derivatives/models/structures_*/ | head -1)"
	@echo "New cohort's labels:  $(abspath $(DEMO_DIR))/new_segmentation (group.html: Dice, HD95 against the reference)"
	@echo "Lesion model:         $$(ls -td $(abspath $(DEMO_DIR))/derivatives/models/lesion_*/ | head -1) (T1w + FLAIR)"
	@echo "New cohort's lesions: $(abspath $(DEMO_DIR))/new_lesions (group.html: Dice, lesion-wise recall and F1)"
	@echo "Subject reports (training cohort, then new cohort with predictions):"
	@for report in $(abspath $(DEMO_DIR))/derivatives/sub-*.html $(abspath $(DEMO_DIR))/new_derivatives/sub-*.html; do \
		echo "  $$report"; done

lint: install
	$(BIN)/ruff check pipeline tests benchmarks templates
	$(BIN)/mypy pipeline

# The suite; the container image and SLURM tests (minutes each, skipped without an engine or a
# cluster), the process-fault tests (runs killed, signalled and run concurrently), the hard-heads
# run (ten hard or bad heads end to end) and the slow end-to-end ones (each preprocesses a cohort of its own:
# morphometry, lesions, unfamiliar images, a second dataset for transfer; or trains on two processes) run with
# `make test-infra`, which .ci/run calls after it.
INFRA := container or slurm or faults or robustness or slow
test: lint
	$(BIN)/python -m pytest -m "not ($(INFRA))" -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# the slow and hard-heads cases on two workers as `make test` does; the container, SLURM and fault tests (builds,
# a 2-CPU cluster, timed kills and signals) after them, on one
PARALLEL_INFRA := (slow or robustness) and not (container or slurm or faults)
test-infra: install
	$(BIN)/python -m pytest -m "$(PARALLEL_INFRA)" -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m "container or slurm or faults" $(PYTEST_ARGS)

benchmark: install
	# editable, as `make install` made it: a plain install would freeze a copy of the code in the venv
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,export,benchmark]"
	$(BIN)/python benchmarks/sample_dataset.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build *.egg-info
