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

.PHONY: install lint test test-floor test-slow demo workflow-tiny rehearsal clean

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

# The oldest transformers pyproject.toml allows (4.56.0, with the huggingface_hub and tokenizers it
# needs) first on the path, under the model-level tests: prompts, decoding, the δ engine and its savings (the
# fp32 attention reaches into transformers' attention and mask registries), generation,
# the architecture adapters.
FLOOR ?= transformers==4.56.0 huggingface_hub==0.36.0 tokenizers==0.22.1
FLOOR_TESTS ?= tests/test_prompts.py tests/test_decoding.py tests/test_engine.py tests/test_speed.py tests/test_generate.py tests/test_adapters.py
# Its contrast (the llama-style update must miss z by > 0.3) was set on transformers 5: on 4.56.2 the
# tiny random gemma2 / gemma3_text give 0.22 / 0.26, while muke's update still reaches z (gap 4e-7 < 1e-4).
POST_NORM_TEST := tests/test_adapters.py::test_memit_through_the_post_mlp_norm_reproduces_a_reachable_target
FLOOR_DESELECT ?= "$(POST_NORM_TEST)[gemma2]" "$(POST_NORM_TEST)[gemma3_text]"
test-floor: install
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/floor $(FLOOR)
	PYTHONPATH=$(VENV)/floor $(PY) -m pytest -q -m "not slow" -p no:cacheprovider $(FLOOR_TESTS) \
		$(addprefix --deselect ,$(FLOOR_DESELECT))

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
