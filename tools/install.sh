#!/usr/bin/env bash
# Idempotent installer for a Debian 12 machine (run as root, or as a user with sudo when
# Debian packages are missing). Installs what is missing and nothing else; starts no service.
#
#   1. Debian packages: orthanc dcmtk dicom3tools redis-server python3-venv make
#      (apt-get update + install only when one is missing).
#   2. .venv with `python3 -m venv` when missing ($PYTHON picks another interpreter, >= 3.11).
#   3. torch==2.13.0 alone first, then `pip install -e '.[dev]'` with torch pinned by a
#      constraints file, so pip never resolves another torch or its CUDA packages.
#      Skipped when .venv/.mammo-install-stamp matches the hash of pyproject.toml + this file.
#   4. Verifies: `pip check`, and torch imports as 2.13.0.
#
# torch comes from pip's own configuration (our machines: a CPU wheel on disk via
# find-links). On another machine, pick the wheel index explicitly, e.g.
#   MAMMO_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu tools/install.sh
# (plain PyPI serves the CUDA build on Linux x86_64, which pulls ~2 GB of nvidia-* packages).
set -euo pipefail

TORCH_VERSION="2.13.0"
# make: for `make test` after a bare `bash tools/install.sh` on a minimal Debian
DEB_PACKAGES=(orthanc dcmtk dicom3tools redis-server python3-venv make)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.mammo-install-stamp"
PYTHON="${PYTHON:-python3}"

CLEANUP=()
cleanup() { local path; for path in "${CLEANUP[@]}"; do ${SUDO_RM:-rm} -f "$path"; done; }
trap cleanup EXIT

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }

# One installer at a time per checkout (several `make test` may start together).
if command -v flock >/dev/null 2>&1; then
  LOCK="${TMPDIR:-/tmp}/mammo-node-install-$(printf '%s' "$ROOT" | sha256sum | cut -c1-16).lock"
  exec 9>"$LOCK"
  flock 9
fi

# --- 1. Debian packages --------------------------------------------------------------------
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
  say "Debian packages missing: ${missing[*]}"
  SUDO=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "run as root to install: ${missing[*]}"
    SUDO=(sudo)
  fi
  # Keep package scripts from starting redis/orthanc system services (the tests start their
  # own on free ports). Only when no policy is in place already; removed again on exit.
  POLICY=/usr/sbin/policy-rc.d
  if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    [[ -z "${SUDO[*]}" ]] || SUDO_RM="sudo rm"
    CLEANUP+=("$POLICY")
  fi
  export DEBIAN_FRONTEND=noninteractive
  say "apt-get update"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  say "apt-get install ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present: ${DEB_PACKAGES[*]}"
fi

# --- 2. virtual environment ----------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); mammo-node needs Python >= 3.11"
  say "creating .venv with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# --- 3. Python packages --------------------------------------------------------------------
want="$(cat pyproject.toml tools/install.sh | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" ]]; then
  say "Python packages up to date (stamp $(cut -c1-12 <<<"$want"))"
else
  rm -f "$STAMP"
  torch_args=()
  if [[ -n "${MAMMO_TORCH_INDEX_URL:-}" ]]; then
    torch_args=(--index-url "$MAMMO_TORCH_INDEX_URL")
  fi
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    say "torch $TORCH_VERSION present"
  else
    say "pip install torch==$TORCH_VERSION${MAMMO_TORCH_INDEX_URL:+ from $MAMMO_TORCH_INDEX_URL}"
    "${PIP[@]}" install -q "${torch_args[@]}" "torch==$TORCH_VERSION"
  fi
  constraints="$(mktemp)"
  CLEANUP+=("$constraints")
  printf 'torch==%s\n' "$TORCH_VERSION" >"$constraints"
  say "pip install -e '.[dev]' (torch pinned to $TORCH_VERSION)"
  "${PIP[@]}" install -q -c "$constraints" -e '.[dev]'
fi

# --- 4. verify -----------------------------------------------------------------------------
say "verifying"
if ! check="$("${PIP[@]}" check 2>&1)"; then
  rm -f "$STAMP"
  die "pip check failed:
$check"
fi
if ! torch_version="$("$VENV/bin/python" -c "import torch; print(torch.__version__)")" \
  || [[ "$torch_version" != "$TORCH_VERSION"* ]]; then
  rm -f "$STAMP"
  die "torch in .venv is '${torch_version:-not importable}', expected $TORCH_VERSION"
fi
printf '%s\n' "$want" >"$STAMP"
say "done: torch $torch_version, $("$VENV/bin/python" -V)"
