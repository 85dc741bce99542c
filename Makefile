# apicv — every target works on a fresh clone: the virtual environment is created at
# .venv/ and the package (with its CLI, test, dev and cluster (Ray) extras) installed into it
# on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench lint guests fuzz-long clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cli,test,dev,cluster]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apicv demo

# ruff; the layer contracts (import-linter: the model never imports the faces or the real
# backend, the real backend never imports the model); no foreign private access, module sizes
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tools/check_seams.py

# the guest test kernels `apicv boot` runs (freestanding C + assembly, the machine's gcc/ld)
guests:
	$(MAKE) -C guests OUT=$(CURDIR)/build/guests

test: $(STAMP) lint guests linux-if-possible
	$(PY) -m pytest

bench: $(STAMP) guests
	$(PY) benchmarks/run.py

# the minimal Linux guest `apicv boot` runs (README, "Booting Linux"): Debian's
# linux-source-6.1 with guests/linux/apicv.config and a busybox-static initramfs, installed
# with apt (root) and built outside the work tree (~5 min on 2 cores; nothing of theirs is
# committed). tests/test_vmm_linux.py boots it when it is there.
.PHONY: linux
LINUX_DIR ?= /var/cache/apicv/linux
linux:
	sh guests/linux/build.sh $(LINUX_DIR)

# make test builds the Linux guest when it can (root and apt; ~5 min once, then a ~15 s check)
# so that tests/test_vmm_linux.py boots it (~4.5 min); where it cannot, that test is skipped
.PHONY: linux-if-possible
linux-if-possible:
	@mkdir -p build; if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    sh guests/linux/build.sh $(LINUX_DIR) >build/linux.log 2>&1 \
	        && tail -1 build/linux.log \
	        || echo "make linux failed (see build/linux.log): the Linux boot test is skipped"; \
	else echo "not root with apt: the Linux boot test is skipped (make linux builds it)"; fi

# Debian's generic kernel, the second Linux target (README: its command line)
.PHONY: linux-debian
linux-debian:
	sh guests/linux/debian.sh /var/cache/apicv/debian

clean:
	rm -rf $(VENV) build out src/*.egg-info .pytest_cache .ruff_cache .hypothesis
