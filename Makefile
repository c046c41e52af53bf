# The two commands of the README. Each creates or reuses .venv (pip, never uv/poetry).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --quiet -e '.[dev,postgres,auth]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mococxr demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
