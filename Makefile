# The two commands of the README. Each creates or reuses .venv (pip, never uv/poetry).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# Where torch and torchvision come from. Empty (the default): PyPI with the rest, whose Linux wheels are
# CUDA builds (a ~6.4 GB .venv, 3.2 GB of it NVIDIA's libraries). A wheel index such as
# https://download.pytorch.org/whl/cpu (the CPU-only build, ~2 GB .venv) installs them from there first,
# as docker/Dockerfile's TORCH_INDEX does. The value an install used is kept in .venv/.torch-index and
# stays in force for later `make` calls; naming another one (TORCH_INDEX= for PyPI) recreates .venv.
TORCH_MARK := $(VENV)/.torch-index
TORCH_INDEX ?= $(shell cat $(TORCH_MARK) 2>/dev/null)
# the bounds pyproject.toml sets: "torch>=...,<..." "torchvision>=...,<..."
TORCH_PINS := $(shell grep -o '"torch[^"]*"' pyproject.toml)

.PHONY: demo test test-slow lint clean FORCE

# pip's own output is left on (one line per package, a progress bar per download): creating .venv takes
# minutes and should never look stuck. Into a log (not a terminal) pip prints nothing while it installs what
# it downloaded (66 s for torch and its NVIDIA libraries, measured with benchmarks/demo_gaps), so there a
# line every 10 s says that the step still works.
define still_working
if [ -t 1 ]; then $(1); else \
  ( s=0; while sleep 10 && kill -0 $$$$ 2>/dev/null; do s=$$((s + 10)); echo "== $(2): still working ($$s s)"; done ) & \
  beat=$$!; trap 'kill $$beat 2>/dev/null' EXIT; $(1); fi
endef
PIP_INSTALL := $(VENV)/bin/pip install --progress-bar on
EXTRAS := .[dev,postgres,auth,dashboard]

$(STAMP): pyproject.toml Makefile $(TORCH_MARK)  # a changed install line (e.g. a new extra) reinstalls
	@echo "== [1/3] $(VENV): creating a virtual environment with $(PY)"
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@echo "== [2/3] $(VENV): upgrading pip"
	$(VENV)/bin/pip install --progress-bar on --upgrade pip
	@echo "== [3/3] $(VENV): installing mococxr and its dependencies (torch, torchvision, mlflow, optuna," \
	      "optuna-dashboard, ...): the longest step, a few minutes"
	$(if $(TORCH_INDEX),@echo "$(PIP_INSTALL) --index-url '$(TORCH_INDEX)' $(TORCH_PINS)")
	$(if $(TORCH_INDEX),@$(call still_working,$(PIP_INSTALL) --index-url '$(TORCH_INDEX)' $(TORCH_PINS),[3/3] pip (torch)))
	@echo "$(PIP_INSTALL) -e '$(EXTRAS)'"
	@$(call still_working,$(PIP_INSTALL) -e '$(EXTRAS)',[3/3] pip)
	touch $(STAMP)
	@echo "== $(VENV) ready"

# Rewritten only when TORCH_INDEX differs from the last install's (so .venv is then rebuilt); a torch from
# another index replaces the old one only in a fresh .venv (the old one's NVIDIA libraries would stay).
$(TORCH_MARK): FORCE
	@if [ ! -f $@ ] || [ "$$(cat $@)" != '$(TORCH_INDEX)' ]; then \
	  if [ -f $(STAMP) ] && { [ -f $@ ] || [ -n '$(TORCH_INDEX)' ]; }; then \
	    echo "== TORCH_INDEX is now '$(TORCH_INDEX)' (was '$$(cat $@ 2>/dev/null)'): recreating $(VENV)"; \
	    rm -rf $(VENV); \
	  fi; \
	  mkdir -p $(VENV) && printf '%s\n' '$(TORCH_INDEX)' > $@; \
	fi

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
