# haven: two commands do all set-up on a fresh machine.
#   make demo   installs everything into .venv and runs the demo pipeline end to end
#   make test   installs the same and runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint report install system clean

# pydeface --no-deps: its wheel ships a real head with a face (data/mean_reg2mean.nii.gz), the real
# anatomy of tests/test_deface_real.py; only its data is used (its dependencies, nipype, are not needed)
$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps pydeface==2.1.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Slurm, MUNGE, Chromium, Tesseract and Orthanc for the Slurm, browser, OCR and PACS tests (skipped without them); needs root
system:
	.ci/system-setup

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local --report results/report.html
	@echo "Report: results/report.html   MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath results)/mlflow/mlflow.db"

test: $(STAMP) system
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -q

lint: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake data/demo
