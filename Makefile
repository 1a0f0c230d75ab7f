# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON_BOOT ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(INSTALLED): requirements.txt
	command -v $(PYTHON_BOOT) >/dev/null || { echo "need $(PYTHON_BOOT) (or run: make PYTHON_BOOT=python3 ...)"; exit 1; }
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PYTHON) main.py --config=configs/vgg19_mhsa.py:demo --workdir=runs/vgg19_mhsa_demo

test: $(INSTALLED)
	$(PYTHON) -m pytest tests -q

clean:
	rm -rf $(VENV) runs
