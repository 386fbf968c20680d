# make install | demo | test | lint | bench | gpu-check | gpu-bundle | results     (a fresh Debian machine with Python 3.11 needs nothing else)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The install stamp is named by the content of the files install reads, not compared by time: a clone,
# checkout or copy gives files new times, and the same content must not reinstall.
INSTALL_INPUTS := requirements.txt requirements-build.txt requirements-nodeps.txt setup.cfg pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
NPROC ?= 2
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m dist_robust train

.PHONY: install demo test test-fast lint bench gpu-check gpu-bundle results clean

install: $(STAMP) $(FASHION)

# Re-runs only when the content of a requirements file or of the package metadata changes.
$(STAMP):
	@$(MAKE) --no-print-directory ffcv-system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# needs torch (and a C++ compiler, the Python headers, FFCV's system libraries) to build: see requirements-build.txt
	DS_BUILD_SHM_COMM=1 $(PY) -m pip install -q --no-build-isolation -r requirements-build.txt
	# packages whose declared pins would break the environment: no dependencies
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed*
	touch $(STAMP)

# FFCV compiles against OpenCV and libjpeg-turbo: their Debian development packages.
FFCV_APT := pkg-config libopencv-dev libturbojpeg0-dev
.PHONY: ffcv-system-deps
ffcv-system-deps:
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q --no-install-recommends $(FFCV_APT) || \
	    { apt-get update -q && apt-get install -y -q --no-install-recommends $(FFCV_APT); }; \
	  else echo "FFCV needs system libraries: run 'sudo apt-get install $(FFCV_APT)', then make again" >&2; exit 1; fi; \
	fi

# Fashion-MNIST ships as a Debian package.
$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q --no-install-recommends dataset-fashion-mnist || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi

# The main job: a robust Fashion-MNIST source, fine-tuned on Animal-MNIST two ways, against
# adversarial training from scratch; 2 ranks under torchrun. Finished runs resume instantly
# (rm -rf runs/demo for a fresh measurement). DEMO_ARGS: overrides for every run, e.g.
# make demo DEMO_ARGS=data.loader=ffcv (FFCV .beton files, prepared in data/ffcv on first use).
demo: install
	@start=$$(date +%s); \
	$(TORCHRUN) configs/demo/source_at.yaml $(DEMO_ARGS) && \
	$(TORCHRUN) configs/demo/finetune_standard.yaml $(DEMO_ARGS) && \
	$(TORCHRUN) configs/demo/finetune_aft.yaml $(DEMO_ARGS) && \
	$(TORCHRUN) configs/demo/scratch_at.yaml $(DEMO_ARGS) && \
	$(PY) -m dist_robust report runs/demo/source_at runs/demo/finetune_standard runs/demo/finetune_aft runs/demo/scratch_at && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

test: install
	$(PY) -m pytest -q tests

# ruff with the rules of pyproject.toml (pyflakes, import order, bugbear) on everything Python here;
# .ci/run and the pre-commit hook (.pre-commit-config.yaml) run it. `make lint FIX=1` sorts imports.
lint: install
	$(VENV)/bin/ruff check $(if $(FIX),--fix )dist_robust tests bench scripts

# The inner loop: every test that runs in this one process in under about 3 s (no rank groups,
# launchers or long attacks; see the markers in setup.cfg). Under 2 minutes on 2 cores.
test-fast: install
	$(PY) -m pytest -q -m "not multiproc and not slow" tests

bench: install
	$(PY) bench/precision.py
	$(PY) bench/attacks.py
	$(PY) bench/autoattack.py

# The GPU acceptance run (scripts/gpu_check.py): stages a-g (2 ranks on one GPU over gloo, nccl, bf16/fp16,
# DeepSpeed ZeRO-2, FFCV, throughput against the bound, CPU against GPU), within 7 minutes on one GPU; prints
# a table, writes results/gpu/DATE-GPU.json, exits 1 if a stage fails, or at once with one line where there
# is no CUDA device. No install step: scripts/gpu_check.sh uses .venv if there is one (make install), else
# python3 with .gpu-bundle/ (the lent GPU machine has no registry: docs/distributed.md). GPU_CHECK_ARGS: e.g.
# --only a,f.
gpu-check:
	@scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# .gpu-bundle/: what the lent GPU machine's python3 lacks, as wheels for CPython 3.12 (scripts/gpu_bundle.sh;
# about 5 MB; GPU_BUNDLE_DATA="mnist animal fashion" adds the offline datasets).
gpu-bundle: install
	scripts/gpu_bundle.sh

# The fine-tuning comparison (configs/finetune/): 2 pairs x 9 methods x 2 seeds on 2 ranks, with
# AutoAttack on 100 points per run; resumable. Writes results/finetune.{md,json}.
results: install
	$(PY) scripts/finetune_results.py

clean:
	rm -rf runs .pytest_cache
