#!/usr/bin/env bash
# A side environment with MMFewShot 0.1.0, the code behind the seed's MAML table, for `make fidelity`
# (benchmarks/fidelity_mmfewshot.py runs its MAML beside fsl's, on the same weights and images).
#
# Usage: scripts/install_mmfewshot.sh FSL_PYTHON SIDE_VENV   (e.g. .venv/bin/python .venv-mmfewshot)
#
# What works, and why (issue #35):
#   - mmfewshot 0.1.0 asserts mmcv 1.3.12-1.4.0 and mmcls 0.15-0.19; mmcls 0.19 fails on import (DistributedSampler
#     is gone from mmcls.datasets.builder), so mmcls 0.18.0;
#   - mmcv 1.4.0 built as pure Python (MMCV_WITH_OPS=0, no CUDA/C++ ops) without build isolation: its setup.py
#     imports pkg_resources, which setuptools 81 removed, so setuptools<81 goes in first;
#   - fsl's torch is reused through a .pth line pointing at fsl's site-packages: a fresh torch pulls gigabytes;
#   - everything with --no-deps, at pinned versions, so nothing of fsl's environment is replaced.
# Packages come through pip, so your pip configuration (index, find-links, proxy) applies; no host is named here.
# The two import shims the comparison needs (no file is patched) live in benchmarks/fidelity_mmfewshot.py.
set -euo pipefail

FSL_PYTHON=${1:?usage: $0 FSL_PYTHON SIDE_VENV}
SIDE=${2:?usage: $0 FSL_PYTHON SIDE_VENV}
STAMP="$SIDE/.fsl-mmfewshot-stamp"
[ -f "$STAMP" ] && { echo "$SIDE: MMFewShot side environment already installed"; exit 0; }

version=$("$FSL_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
base=$("$FSL_PYTHON" -c 'import sys; print(sys._base_executable)')
site=$("$FSL_PYTHON" -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parents[1])')
echo "creating $SIDE with Python $version, reusing fsl's torch from $site"
rm -rf "$SIDE"
"$base" -m venv "$SIDE"
PY="$SIDE/bin/python"
side_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$side_site/fsl-site.pth"   # after the side env's own site-packages: its packages win

pip_install() {
    if ! "$PY" -m pip install -q --no-deps "$@"; then
        echo "error: pip could not install $* into $SIDE (offline, or your index lacks it)" >&2
        echo "fix: make these reachable through your pip index or PIP_FIND_LINKS (a folder of the files), then" \
             "rerun 'make fidelity'" >&2
        exit 1
    fi
}
pip_install "setuptools<81" wheel
MMCV_WITH_OPS=0 pip_install --no-build-isolation "mmcv==1.4.0"
pip_install "mmcls==0.18.0" "mmfewshot==0.1.0" addict "yapf==0.40.1" "opencv-python-headless==4.10.0.84" six \
    "terminaltables==3.1.10" "platformdirs==4.3.6" "tomli==2.2.1" "importlib-metadata==8.5.0" "zipp==3.21.0"
"$PY" - <<'PY'
import sys, types, importlib.util, pathlib
spec = importlib.util.find_spec("mmfewshot")
pkg = types.ModuleType("mmfewshot"); pkg.__path__ = [str(pathlib.Path(spec.origin).parent)]; sys.modules["mmfewshot"] = pkg
import mmcv, mmcls, torch, cv2
print("side environment ready: mmcv", mmcv.__version__, "mmcls", mmcls.__version__, "torch", torch.__version__,
      "opencv", cv2.__version__)
PY
touch "$STAMP"
