# The two commands of the README. Each creates or reuses .venv (pip, never uv/poetry).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint clean

# pip's own output is left on (one line per package, a progress bar per download): creating .venv takes
# minutes and should never look stuck.
$(STAMP): pyproject.toml Makefile  # a changed install line (e.g. a new extra) reinstalls
	@echo "== [1/3] $(VENV): creating a virtual environment with $(PY)"
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@echo "== [2/3] $(VENV): upgrading pip"
	$(VENV)/bin/pip install --progress-bar on --upgrade pip
	@echo "== [3/3] $(VENV): installing mococxr and its dependencies (torch, torchvision, mlflow, optuna," \
	      "optuna-dashboard, ...): the longest step, a few minutes"
	$(VENV)/bin/pip install --progress-bar on -e '.[dev,postgres,auth,dashboard]'
	touch $(STAMP)
	@echo "== $(VENV) ready"

demo: $(STAMP)
	$(VENV)/bin/mococxr demo

# The default run leaves out the tests marked slow (each longer than ~30 s: whole plans, demos, servers,
# torchrun); .ci/run runs them after it, in `make test-slow`.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
