#!/usr/bin/env bash
# Install natd on a stock Debian 12/13 machine, as root, from this checkout.
#
# Debian's python3 refuses `pip install` into the system (PEP 668, "externally-managed-
# environment") and often has no pip at all, so natd goes into its own virtual environment made
# with the system /usr/bin/python3, and its commands are linked onto PATH:
#
#   /opt/natd/                       the venv (natd and its Python dependencies)
#   /usr/local/bin/natd, natd-passt  symlinks into /opt/natd/bin
#
# Options:
#   --test          also install the test extras (pytest, hypothesis, ruff, mypy): what .ci/run uses
#   --prefix DIR    the venv directory (default /opt/natd)
#   --bindir DIR    where the commands are linked (default /usr/local/bin)
#   --no-apt        do not install Debian packages (they must be there already)
#
# Running it again upgrades natd in place. Remove with: rm -rf /opt/natd /usr/local/bin/natd*
set -euo pipefail

prefix=/opt/natd
bindir=/usr/local/bin
extras=""
use_apt=1
while [ $# -gt 0 ]; do
    case "$1" in
        --test) extras="[test]" ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --bindir) bindir=${2:?--bindir needs a directory}; shift ;;
        --no-apt) use_apt=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see install.sh --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")"
python=/usr/bin/python3
parent=$(dirname "$prefix")
if [ ! -w "$parent" ] && [ ! -w "$prefix" ]; then
    echo "install.sh: cannot write $prefix: run as root, or choose --prefix and --bindir" >&2
    exit 1
fi

# What building the venv needs: venv + ensurepip (python3-venv), and a C compiler with the
# Python headers for dependencies that have no wheel for this Python (python-pytun on a new
# Python release). apt runs only when something is missing, so a ready machine is left alone.
need=(python3 python3-venv python3-dev gcc)
missing=()
for pkg in "${need[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$use_apt" -eq 0 ]; then
        echo "install.sh: missing Debian packages: ${missing[*]} (drop --no-apt to install them)" >&2
        exit 1
    fi
    echo "install.sh: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -o Acquire::Retries=3
    apt-get install -y --no-install-recommends -o Acquire::Retries=3 "${missing[@]}"
fi

if [ ! -x "$prefix/bin/python" ]; then
    echo "install.sh: creating the venv $prefix with $python"
    "$python" -m venv "$prefix"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
"$prefix/bin/python" -m pip install --quiet --upgrade pip
"$prefix/bin/python" -m pip install --quiet --upgrade ".$extras"

mkdir -p "$bindir"
for cmd in natd natd-passt; do
    if [ -x "$prefix/bin/$cmd" ]; then
        ln -sfn "$prefix/bin/$cmd" "$bindir/$cmd"
        echo "install.sh: $bindir/$cmd -> $prefix/bin/$cmd"
    fi
done
"$bindir/natd" --version
