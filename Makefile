# Two commands for a newcomer: `make demo` and `make test`.  Both create .venv
# on first use from pyproject.toml, every version pinned by requirements.lock.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: test test-fast demo bench install prometheus clean lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip 23 cannot resolve ray's extras under a constraints file; 24+ can.
	$(PIP) install --quiet --upgrade 'pip>=24'
	$(PIP) install --quiet -c requirements.lock -e '.[test]'
	touch $@

# The telemetry tests scrape real runs with Debian's prometheus server.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus package"; \
	    (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)) \
	     || echo "could not install prometheus; its tests will fail under CI=true"; \
	  else echo "prometheus not found; install it (apt-get install prometheus) to run its tests"; fi; }

# Everything CI must check, in three parts, every part run even when one before it fails:
# the fast lane (seconds); the tests that measure this machine (calibration, regime verdicts),
# alone on it; the rest on two pytest-xdist workers, since much of it waits on processes,
# clusters and servers (a module whose tests share an expensive fixture stays on one worker).
FAST := unit and not integration
test: install prometheus
	@status=0; \
	$(PY) -m pytest -q -n 2 -m "$(FAST)" tests || status=1; \
	$(PY) -m pytest -q -m "timing and not ($(FAST))" tests || status=1; \
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not timing and not ($(FAST))" tests || status=1; \
	exit $$status

# The fast lane alone: schema, storage, checkpoint rules, data readers, fuzzing; no cluster, no server.
test-fast: install
	$(PY) -m pytest -q -m "$(FAST)" tests

demo: install
	$(VENV)/bin/gradyard run jobs/mnist-lenet.yaml --fresh

bench: install prometheus
	$(PY) -m bench

clean:
	rm -rf runs .pytest_cache

# Re-resolve requirements.lock after a change to pyproject.toml: a fresh venv, torch, torchvision
# and ray held at their locked versions (other torch/torchvision pairs break torchvision's
# compiled operators), everything else at the newest versions pyproject allows.
lock:
	rm -rf /tmp/gradyard-lock && $(PYTHON) -m venv /tmp/gradyard-lock
	/tmp/gradyard-lock/bin/pip install --quiet --upgrade 'pip>=24'
	grep -E '^(torch|torchvision|ray)==' requirements.lock > /tmp/gradyard-lock/pins.txt
	/tmp/gradyard-lock/bin/pip install --quiet -c /tmp/gradyard-lock/pins.txt -e '.[test]'
	{ sed -n '/^#/p' requirements.lock; /tmp/gradyard-lock/bin/pip freeze --exclude-editable | grep -v '^gradyard'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
