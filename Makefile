# The README's two commands: `make test` and `make demo`. Both create or reuse .venv/ (pinned by
# constraints.txt; extras `test` and `superb`) and install the system packages they need when missing; a second
# run skips every install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaltm-installed
# gcc: pesq (asteroid, in the superb extra) is built from its source distribution.
SYSTEM_PACKAGES := espeak-ng sox gcc
# vox-profile's own model class, for the tests that write checkpoints with it; its metadata pins
# transformers < 5, which its WavLM wrapper does not need, so it is installed without its dependencies.
VOX_PROFILE := hyperion-voxprofile==0.1.0
# FusionBench, the oracle of tests/test_methods_fusionbench.py. Importing its method modules runs its package
# __init__, which needs exactly these; resolving their metadata would move our pins (hydra-core wants omegaconf
# < 2.4) and pull more (pytorch-lightning), so all are installed without dependencies; constraints.txt holds.
FUSION_BENCH := fusion-bench==0.2.33 bidict==0.24.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 \
	lightning==2.6.6 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 xxhash==4.1.0 peft==0.21.2

.PHONY: setup system-packages test lint demo superb-test clean

setup: system-packages $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,superb]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(VOX_PROFILE)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(FUSION_BENCH)
	@touch $@

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	fi

lint: setup
	$(BIN)/ruff check .

# The suite in TEST_WORKERS processes (pytest-xdist), a test file per process at a time: module fixtures (a
# launcher run shared by a file's tests) are built once. Two keep 2 cores busy (one process leaves half idle while
# a launcher starts); raise it on a larger machine, each worker needs up to ~3 GB.
TEST_WORKERS ?= 2

test: setup lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	$(BIN)/adaltm demo

# s3prl's stock SUPERB downstreams (the `superb` extra): every expert imports; four tasks train and test on tiny data.
superb-test: setup
	$(BIN)/python -m pytest -q tests/test_superb.py tests/test_sox_effects.py

clean:
	rm -rf $(VENV) results/demo
