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

.PHONY: install test test-slow demo workflow-tiny clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[workflow,eval,test]"
	touch $@

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# Until the workflow lands: one μKE-MEMIT edit of a pretrained tiny model, printing before/after answers.
demo: install
	test -d work/demo/tiny || $(VENV)/bin/muke tiny-model --arch qwen2 --out work/demo/tiny --pretrain-steps 300
	$(VENV)/bin/muke edit --model work/demo/tiny --method muke-memit --layers 1 2 --window 20 \
		--requests resources/demo_edits.jsonl --format jsonl --limit 1 --max-new-tokens 200

clean:
	rm -rf $(VENV) results .snakemake

# The whole workflow DAG on a tiny model (minutes on 2 CPU cores; the numbers mean nothing).
workflow-tiny: install
	$(VENV)/bin/snakemake --profile workflow/profiles/default --configfile config/tiny.yaml
