#!/usr/bin/env bash
# The bench's GPU check: lit-rlhf's phases on the large case in bf16 under FSDP2 on one GPU, with tokens/s (pairs/s,
# episodes/s) and MFU against the GPU's measured bf16 matmul peak. For a machine with a GPU, PyTorch, Lightning and
# transformers but no package index, such as the device machines some development sessions are lent:
#
#   bash bench/gpu_check.sh --download [more packages]   # here, with an index: the packages such a machine lacks,
#                                        # as wheels for its Python 3.12, in bench/.wheels (git-ignored, about 2 MB)
#   bash bench/gpu_check.sh [run.py options]   # there, bench/.wheels carried along: install them beside the
#                                        # checkout, check that lit-rlhf imports, build the large case, time every
#                                        # phase once (TRL is not run)
#
# The versions are the project venv's, so both machines run the same data and CLI code. `datasets` needs
# pyarrow >= its own minimum: if the import check names pyarrow, add it (`--download pyarrow`, about 40 MB).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wheels="$here/.wheels"
PACKAGES=(datasets dill multiprocess jsonargparse docstring_parser typeshed_client)

if [ "${1:-}" = "--download" ]; then
    shift
    PACKAGES+=("$@")
    main_python="${MAIN_PYTHON:-$here/../.venv/bin/python}"
    mapfile -t pinned < <("$main_python" -c '
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")' "${PACKAGES[@]}")
    "$main_python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$wheels" "${pinned[@]}"
    ls "$wheels"
    exit 0
fi

python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || { echo "gpu_check.sh: the wheels are for Python 3.12, python3 is $(python3 --version)" >&2; exit 1; }
site=/tmp/lit-rlhf-site
rm -rf "$site"
python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$here/.." PYTHONUNBUFFERED=1
cd "$here/.."
python3 -c 'import datasets, jsonargparse, lit_rlhf.cli, lit_rlhf.data.sources'  # a missing package fails here, cheaply
python3 bench/run.py --large --accelerator gpu --precision bf16-mixed --fsdp --passes 1 \
    --phases sft,rm,dpo,ppo --steps 12 --warmup-steps 2 "$@"
