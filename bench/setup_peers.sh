#!/usr/bin/env bash
# Builds the peer libraries' virtual environments that bench/run.py compares lit-rlhf against.
#
#   bash bench/setup_peers.sh            # both venvs
#
# Each peer lives in its own venv beside this script, never in the project's venv and never as a dependency of
# the package: TRL 0.19.x (the last release with PPOTrainer) and TRL 1.x cannot share one environment.
#   bench/.venv-trl1    latest TRL 1.x: SFTTrainer, RewardTrainer, DPOTrainer
#   bench/.venv-trl019  trl==0.19.1:    PPOTrainer
#
# Both get the same torch and transformers as the project's venv, so the two sides run the same kernels and the same
# GPT-2 code: torch==2.13.0 first (a bare `torch` requirement would pull a multi-GB CUDA build), then transformers
# pinned to the project's version. trl 0.19.1 declares transformers>=4.51 and TRL 1.x transformers>=4.56.2, so
# both accept the project's transformers 5.x as it is (checked: trl 0.19.1's PPOTrainer trains under transformers
# 5.24, with deprecation warnings only); no other pin was needed. Rerunning the script updates the venvs in place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
main_python="${MAIN_PYTHON:-$here/../.venv/bin/python}"
[ -x "$main_python" ] || main_python="$(command -v python3)"
python_for_venvs="${PEER_PYTHON:-$main_python}"

TORCH_VERSION="2.13.0"
# The project's transformers, so both sides run the same model code; override with TRANSFORMERS_VERSION=...
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-$("$main_python" -c 'import transformers; print(transformers.__version__)' \
    2>/dev/null || true)}"
transformers_requirement="transformers${TRANSFORMERS_VERSION:+==$TRANSFORMERS_VERSION}"  # unpinned if unknown

make_peer_venv() {  # make_peer_venv FOLDER TRL_REQUIREMENT
    local venv="$1" trl_requirement="$2"
    echo "== $venv: $trl_requirement, torch==$TORCH_VERSION, $transformers_requirement"
    "$python_for_venvs" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    "$venv/bin/python" -m pip install --quiet "$trl_requirement" "$transformers_requirement"
    "$venv/bin/python" -c 'import torch, transformers, trl; print("   torch", torch.__version__, "transformers",
      transformers.__version__, "trl", trl.__version__)'
}

make_peer_venv "$here/.venv-trl1" "trl>=1,<2"
make_peer_venv "$here/.venv-trl019" "trl==0.19.1"
