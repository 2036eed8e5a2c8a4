# Two commands a new user needs:  make demo   and   make test
# Both build .venv on a fresh machine from requirements/lock.txt: exact versions with hashes
# (the CPU build of torch included), so a fresh clone installs the same packages on any day.
#   make lock         re-resolve the lock from pyproject.toml's ranges, on purpose
#   make test-latest  the suite against the newest releases the ranges allow, in .venv-latest
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
LOCK    := requirements/lock.txt
PIP     := pip==26.3
# pip-tools resolves through pip, so it sees this platform's CPU torch wheel (uv does not look there)
PIPTOOLS := pip-tools==7.7.0
TORCH   ?= torch==2.13.0
LATEST  ?= .venv-latest

.PHONY: install demo test test-fast test-latest lock experiment clean

$(STAMP): $(LOCK) pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(PIP)"
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpo-lightning fit --config recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# the suite without the end-to-end tests marked slow (each over ~20 s on a CPU)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The newest releases the ranges in pyproject.toml allow (torch stays the CPU build named by
# TORCH): finds a dependency's breaking release before the lock is refreshed onto it.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "$(PIP)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q tests

lock:
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(PIP)" "$(PIPTOOLS)"
	.venv-lock/bin/pip-compile --quiet --upgrade --extra dev --generate-hashes --allow-unsafe \
		--strip-extras --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml requirements/pins.in
	@echo "lock refreshed: review 'git diff $(LOCK)', run 'make test', commit both"

# The controlled-sentiment frontier (docs/frontier.md): 5 seeds, 68 runs; 26.9 minutes measured on 2 free cores (2974 CPU s).
experiment: $(STAMP)
	$(PY) scripts/sentiment_frontier.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock outputs lightning_logs
