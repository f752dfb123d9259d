# Quick start: `make demo` (analysis of the built-in model, offline) and `make test`.
# Everything installs into .venv (with access to an existing torch, which is kept).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
export MI_PRUN_DATA_DIR ?= $(if $(wildcard $(DATA_DIR)/wikitext2-test.raw),$(DATA_DIR),)

.PHONY: install demo app test test-fast browser-deps bench-quality bench-speed clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[app,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mi-prun analyze --model smollm2-135m --calib builtin --samples 16 --tokens 128 --out runs/demo --overwrite
	$(VENV)/bin/mi-prun select runs/demo --ratio 0.25 --compare

app: install
	$(VENV)/bin/streamlit run app.py --browser.gatherUsageStats false

# Debian's chromium for the browser test (never a downloaded browser); skipped if apt is unavailable.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

test: install browser-deps
	$(PY) -m pytest -q --durations=30

test-fast: install
	$(PY) -m pytest -q -m "not real_model and not browser"

bench-quality: install
	$(PY) benchmarks/quality.py

bench-speed: install
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache test-artifacts
