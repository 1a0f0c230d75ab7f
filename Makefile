# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON_BOOT ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The test runner and the test references (Keras, TensorFlow, libtpu, nbclient): `make test` only.
TEST_INSTALLED := $(VENV)/.installed-test
# The peer frameworks of `make peers` only (benchmarks/requirements.txt): PyTorch is large.
PEERS_INSTALLED := $(VENV)/.installed-peers
# The mutation tester of `make mutants` only (requirements-mutants.txt).
MUTANTS_INSTALLED := $(VENV)/.installed-mutants
# allflax's XLA:CPU kernels, one XLA FFI library (allflax/cpu/kernels.py).
CPU_KERNELS := allflax/cpu/_cpu_kernels.so
CPU_KERNEL_SOURCES := allflax/cpu/onednn_conv.cc allflax/cpu/activation_kernels.cc

.PHONY: demo test pyversions peers mutants clean

$(INSTALLED): requirements.txt requirements-cpu.txt requirements-nodeps.txt
	command -v $(PYTHON_BOOT) >/dev/null || { echo "need $(PYTHON_BOOT) (or run: make PYTHON_BOOT=python3 ...)"; exit 1; }
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-cpu.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(INSTALLED)

$(TEST_INSTALLED): requirements-test.txt $(INSTALLED)
	$(PYTHON) -m pip install --quiet -r requirements-test.txt
	touch $(TEST_INSTALLED)

# Written under another name first: a failed build never leaves a library that looks built.
# -fno-trapping-math lets GCC vectorise the batch-norm loops' float comparisons.
$(CPU_KERNELS): $(CPU_KERNEL_SOURCES) $(INSTALLED)
	@if test -f $(VENV)/include/oneapi/dnnl/dnnl.hpp; then \
	  echo "building $@"; \
	  $(CXX) -O3 -fno-trapping-math -fopenmp -std=c++17 -shared -fPIC -I$(VENV)/include \
	    -isystem "$$($(PYTHON) -c 'import jax; print(jax.ffi.include_dir())')" $(CPU_KERNEL_SOURCES) -o $@.partial \
	    -L$(VENV)/lib -ldnnl -Wl,-rpath,$(abspath $(VENV))/lib && mv $@.partial $@; \
	else echo "no oneDNN wheel for this platform: convolutions and batch norms stay XLA's"; fi

demo: $(INSTALLED) $(CPU_KERNELS)
	$(PYTHON) main.py --config=configs/vgg19_mhsa.py:demo --workdir=runs/vgg19_mhsa_demo
	$(PYTHON) main.py --mode=export --workdir=runs/vgg19_mhsa_demo --output=runs/vgg19_mhsa_demo_bundle

test: $(TEST_INSTALLED) $(CPU_KERNELS)
	$(PYTHON) -m pytest tests -q -n 2 --dist loadfile

# Colab's Pythons and others newer than the venv's: every pin resolves to wheels for them (promise,
# a tensorflow-datasets dependency, is published as source only). Asks the package registry.
PYTHON_VERSIONS := 3.12 3.13
pyversions: $(TEST_INSTALLED)
	@for version in $(PYTHON_VERSIONS); do \
	  $(VENV)/bin/uv pip compile --quiet --python-version $$version --python-platform x86_64-manylinux_2_35 \
	    --only-binary :all: --no-binary promise requirements.txt requirements-cpu.txt requirements-test.txt \
	    -o /dev/null || exit 1; \
	  echo "the pinned requirements resolve to wheels for Python $$version"; done

$(PEERS_INSTALLED): benchmarks/requirements.txt $(TEST_INSTALLED)
	$(PYTHON) -m pip install --quiet -r benchmarks/requirements.txt
	touch $(PEERS_INSTALLED)

# Our train step against Keras 3 (TensorFlow, JAX) and PyTorch: benchmarks/peers.{md,json}.
peers: $(PEERS_INSTALLED) $(CPU_KERNELS)
	$(PYTHON) -m benchmarks.peers

$(MUTANTS_INSTALLED): requirements-mutants.txt $(TEST_INSTALLED)
	$(PYTHON) -m pip install --quiet -r requirements-mutants.txt
	touch $(MUTANTS_INSTALLED)

# Mutation testing of the modules in benchmarks/mutants.py, each against its own fast tests: kill
# rates, the mutants left, and a failure under 85 %. `make mutants MUTANTS="metrics splits"` for some.
mutants: $(MUTANTS_INSTALLED) $(CPU_KERNELS)
	$(PYTHON) -m benchmarks.mutants $(MUTANTS)

clean:
	rm -rf $(VENV) runs mutants $(CPU_KERNELS)
