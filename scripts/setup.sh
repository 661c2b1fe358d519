#!/usr/bin/env bash
# Set up rtnode on Debian (Python 3.11, no GPU needed): DICOM tools, .venv, CPU torch, the package.
# Idempotent: a second run only checks. Needs root (or sudo) for the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser the web app's Playwright tests drive (Playwright cannot download its own here).
# postgresql: the tests start throw-away clusters of it (the Debian service itself is never used).
# systemd: its systemd-analyze verifies the units of deploy/ (tests/test_install_service.py).
debian_packages=(dcmtk dicom3tools plastimatch openssl chromium postgresql systemd)
missing=()
for tool in storescu dciodvfy plastimatch openssl chromium systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(initdb)
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages ${debian_packages[*]} (missing: ${missing[*]})"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${debian_packages[@]}" >/dev/null
fi

# Orthanc for tests/test_orthanc.py, which runs /usr/sbin/Orthanc with its own configuration on free loopback
# ports. The package enables a system service (a PACS on ports 4242 and 8042); when this script installed the
# package and systemd runs, that service is stopped and disabled again: the tests never use it.
if [ ! -x /usr/sbin/Orthanc ] && ! command -v Orthanc >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages orthanc orthanc-dicomweb (for the tests)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        $sudo systemctl disable --now orthanc.service >/dev/null 2>&1 || true
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# The CPU wheel: any other torch spec here would pull a multi-GB CUDA build.
# GPU users: see README.md, "Using an NVIDIA GPU".
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" install torch==2.13.0
# The installed torch named beside the extras: nnunetv2's dependencies would otherwise replace it with the newest
# (CUDA) build. Its torchvision comes from PyPI, a CUDA build whose C++ ops do not load beside the CPU torch;
# node/pipeline/nnunet.py never imports it.
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
"${pip[@]}" install "torch==$torch_version" -e '.[test,nnunet]'
echo "setup: done (.venv/bin/rtnode)"
