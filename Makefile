# The two commands are `make run` and `make test`; both set up everything they need
# on a fresh Debian 12 machine (root, or a user with sudo) and are safe to re-run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# fuse3/libfuse3-dev/pkg-config build and mount pyfuse3; rsync, attr (getfattr/setfattr),
# zip/unzip, inotify-tools and e2fsprogs (mkfs for the small-store tests) are used by tests
# and benches; python3-dev/-venv and gcc let a stock Debian python build pyfuse3.
# systemd provides systemd-analyze (the tests verify the units); util-linux and passwd
# provide setpriv and useradd (the multi-user tests run commands as a second user).
# autoconf, automake, gcc, make and libacl1-dev build pjdfstest (tests/test_conformance.py,
# from ../shared/tools/); perl provides prove, which runs it.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
                rsync attr zip unzip inotify-tools e2fsprogs systemd util-linux passwd \
                autoconf automake make libacl1-dev perl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# `make install`: the package in its own venv, the command on PATH, the units, the config
# example (and a config, only if there is none: an upgrade never touches yours), the
# README. Override the paths to stage an install elsewhere (the tests do).
PREFIX     ?= /opt/fsagent
BINDIR     ?= /usr/local/bin
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system
DOCDIR     ?= /usr/share/doc/fsagent

.PHONY: run test setup system-packages bench bench-filesets bench-upload-rpc bench-repository soak clean install

run: setup
	$(BIN)/fsagent run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: system-packages $(VENV)/.installed

# apt's locks: on a freshly booted machine unattended-upgrades (or another install, a
# parallel CI job) may hold them, and apt-get then fails at once with exit 100. Wait up to APT_LOCK_WAIT
# seconds instead: DPkg::Lock::Timeout makes `install` wait for the dpkg lock; `update`
# takes the package lists lock, which apt (2.6, Debian 12) does not wait for under any
# option, so it is retried while "Could not get lock" is what failed it.
APT_LOCK_WAIT ?= 600
APT_GET := $(SUDO) apt-get -o DPkg::Lock::Timeout=$(APT_LOCK_WAIT)

# dpkg-query first, so a machine that has everything never touches apt.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  waited=0; \
	  until out=$$($(APT_GET) update -qq 2>&1); do \
	    case "$$out" in *"Could not get lock"*) ;; *) echo "$$out" >&2; exit 100;; esac; \
	    if [ $$waited -ge $(APT_LOCK_WAIT) ]; then echo "$$out" >&2; exit 100; fi; \
	    [ $$waited -gt 0 ] || echo "waiting for the apt package lists lock (another apt runs)"; \
	    sleep 5; waited=$$((waited + 5)); \
	  done; \
	  [ -z "$$out" ] || echo "$$out" >&2; \
	  DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: system-packages
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade .
	install -d $(BINDIR) $(SYSCONFDIR)/fsagent $(UNITDIR) $(DOCDIR)
	ln -sfn $(PREFIX)/bin/fsagent $(BINDIR)/fsagent
	install -m 0644 systemd/fsagent.toml.example $(SYSCONFDIR)/fsagent/fsagent.toml.example
	[ -e $(SYSCONFDIR)/fsagent/fsagent.toml ] || \
	  install -m 0644 systemd/fsagent.toml.example $(SYSCONFDIR)/fsagent/fsagent.toml
	for unit in fsagent.service fsagent@.service; do \
	  sed -e 's|/usr/local/bin/fsagent|$(BINDIR)/fsagent|g' \
	      -e 's|/etc/fsagent/|$(SYSCONFDIR)/fsagent/|g' \
	      -e 's|/usr/share/doc/fsagent/|$(DOCDIR)/|g' \
	      systemd/$$unit > $(UNITDIR)/$$unit.tmp && mv $(UNITDIR)/$$unit.tmp $(UNITDIR)/$$unit; \
	done
	install -m 0644 README.md $(DOCDIR)/README.md
	@if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then \
	  systemctl daemon-reload; fi
	@echo "installed; edit $(SYSCONFDIR)/fsagent/fsagent.toml, then: systemctl enable --now fsagent"

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The small-files bench (issue 12, bench/bench_filesets.py) on a snapshot of HEAD (git
# archive): `python -m fsagent` imports the tree it is given, and a checkout that changes
# during a 20-minute run would change the agent under test. Uncommitted changes are not
# benched. `make bench-filesets BENCH_ARGS="--big"` adds the 100,000-file run.
BENCH_CODE := .build/bench-code
bench-filesets: setup
	rm -rf $(BENCH_CODE) && mkdir -p $(BENCH_CODE)
	git archive HEAD | tar -x -C $(BENCH_CODE)
	git rev-parse HEAD > $(BENCH_CODE)/COMMIT
	$(BIN)/python $(BENCH_CODE)/bench/bench_filesets.py $(BENCH_ARGS)

# `fsagent upload` over RPC against cp/rsync into the mount (issue 13,
# bench/bench_upload_rpc.py), on a snapshot of HEAD like bench-filesets.
# `make bench-upload-rpc BENCH_ARGS="--quick"` for a short run.
bench-upload-rpc: setup
	rm -rf $(BENCH_CODE) && mkdir -p $(BENCH_CODE)
	git archive HEAD | tar -x -C $(BENCH_CODE)
	git rev-parse HEAD > $(BENCH_CODE)/COMMIT
	$(BIN)/python $(BENCH_CODE)/bench/bench_upload_rpc.py $(BENCH_ARGS)

# The S3 repository bench (issue 14, bench/bench_repository.py): the push of a 2 GiB file
# and of 5,000 x 4 KiB files to a local S3 server against `rclone copy`, on a snapshot of
# HEAD like bench-filesets. `make bench-repository BENCH_ARGS="--runs 5 --server seaweedfs"`.
bench-repository: setup
	rm -rf $(BENCH_CODE) && mkdir -p $(BENCH_CODE)
	git archive HEAD | tar -x -C $(BENCH_CODE)
	git rev-parse HEAD > $(BENCH_CODE)/COMMIT
	$(BIN)/python $(BENCH_CODE)/bench/bench_repository.py $(BENCH_ARGS)

# The crash soak (issue 10): rounds of the model-based crash workload (tests/crash_model.py),
# the agent killed or stopped at random moments; prints the rounds played and every violation
# with its seed. `make soak SOAK_ROUNDS=200`, `make soak SOAK_ARGS="--seed 42 --keep-going"`.
SOAK_ROUNDS ?= 2000
soak: setup
	$(BIN)/python bench/soak_crash.py --rounds $(SOAK_ROUNDS) $(SOAK_ARGS)

clean:
	-fusermount3 -uz mnt 2>/dev/null
	rm -rf $(VENV) .fsagent *.egg-info .build
