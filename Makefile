# The two commands are `make run` and `make test`; both set up everything they need
# on a fresh Debian 12 machine (root, or a user with sudo) and are safe to re-run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# fuse3/libfuse3-dev/pkg-config build and mount pyfuse3; rsync, attr (getfattr/setfattr),
# zip/unzip, inotify-tools and e2fsprogs (mkfs for the small-store tests) are used by tests
# and benches; python3-dev/-venv and gcc let a stock Debian python build pyfuse3.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
                rsync attr zip unzip inotify-tools e2fsprogs
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup system-packages bench clean

run: setup
	$(BIN)/fsagent run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: system-packages $(VENV)/.installed

# dpkg-query first, so a machine that has everything never touches apt.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	-fusermount3 -uz mnt 2>/dev/null
	rm -rf $(VENV) .fsagent *.egg-info
