#!/usr/bin/env bash
# The Python packages the launcher path needs that the GPU machine's image lacks (the device tool's KINDS.md lists
# what it holds: torch, torchaudio, transformers, numpy, pyyaml, safetensors, tqdm, ... but not these), as wheels
# for its Python 3.12 on x86-64, into .whl/ (git-ignored), at the versions of constraints.txt. Run it here, where
# pip reaches PyPI, before the device run; that run carries ".whl" and benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip)
mkdir -p .whl
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -c constraints.txt -d .whl soundfile cffi pycparser soxr tensorboardX omegaconf
"${PIP[@]}" wheel -q --no-deps -c constraints.txt -w .whl s3prl   # s3prl publishes a source distribution only
du -sh .whl && ls .whl
