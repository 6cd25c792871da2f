#!/usr/bin/env bash
# Idempotent installer for a Debian 12 machine (run as root, or as a user with sudo when
# Debian packages are missing). Installs what is missing and nothing else; starts no service.
#
#   1. Debian packages: orthanc dcmtk dicom3tools redis-server python3-venv make pixelmed-apps prometheus orthanc-dicomweb chromium nodejs
#      (apt-get update + install only when one is missing).
#   2. .venv with `python3 -m venv` when missing ($PYTHON picks another interpreter, >= 3.11).
#   3. torch==2.13.0 alone first, then `pip install -e '.[dev]'` with torch pinned by a
#      constraints file, so pip never resolves another torch or its CUDA packages.
#      Skipped when .venv/.mammo-install-stamp matches the hash of pyproject.toml + this file.
#   4. Verifies: `pip check`, and torch imports as 2.13.0.
#   5. The viewer in the loop (tests/integration/test_viewer.py, `make demo`), in .viewer/:
#      playwright-core by `npm ci` from tools/viewer/package-lock.json (it drives Debian's
#      /usr/bin/chromium; no browser is ever downloaded), and OHIF's static build: `npm pack`
#      of @ohif/app (version and sha512 pinned in tools/viewer/package.json: its npm
#      dependencies are build-time only and not all published, so it is not `npm install`ed),
#      dist/ unpacked to .viewer/ohif and corrected by `python -m tools.stack.viewer patch`.
#      Skipped when .viewer/.mammo-viewer-stamp matches the hash of those files.
#
# torch comes from pip's own configuration (our machines: a CPU wheel on disk via
# find-links). On another machine, pick the wheel index explicitly, e.g.
#   MAMMO_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu tools/install.sh
# (plain PyPI serves the CUDA build on Linux x86_64, which pulls ~2 GB of nvidia-* packages).
set -euo pipefail

TORCH_VERSION="2.13.0"
# make: for `make test` after a bare `bash tools/install.sh` on a minimal Debian
DEB_PACKAGES=(orthanc dcmtk dicom3tools redis-server python3-venv make pixelmed-apps prometheus orthanc-dicomweb chromium nodejs)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.mammo-install-stamp"
PYTHON="${PYTHON:-python3}"

CLEANUP=()
CLEANUP_DIRS=()
cleanup() {
  local path
  for path in "${CLEANUP[@]}"; do ${SUDO_RM:-rm} -f "$path"; done
  for path in "${CLEANUP_DIRS[@]}"; do rm -rf "$path"; done
}
trap cleanup EXIT

# Every line says how long the install has run; each phase is announced, so four quiet
# minutes of pip never look like a hang.
say() { printf 'install [%4ds]: %s\n' "$SECONDS" "$*"; }
die() { printf 'install [%4ds]: ERROR: %s\n' "$SECONDS" "$*" >&2; exit 1; }
PHASE=0
phase() { PHASE=$((PHASE + 1)); say "== phase $PHASE: $*"; }
# pip, showing one line per package it collects or installs; the whole output is kept and its
# tail shown if pip fails.
pip_progress() {
  local log status
  log="$(mktemp)"
  CLEANUP+=("$log")
  set +e
  "${PIP[@]}" install --progress-bar off "$@" 2>&1 | tee "$log" \
    | sed -un 's/^\(Collecting [^ ]*\|Installing collected packages\|Successfully installed\).*/install        pip: \1/p'
  status=${PIPESTATUS[0]}
  set -e
  ((status == 0)) || die "pip install $* failed:
$(tail -n 30 "$log")"
}

# One installer at a time per checkout (several `make test` may start together).
if command -v flock >/dev/null 2>&1; then
  LOCK="${TMPDIR:-/tmp}/mammo-node-install-$(printf '%s' "$ROOT" | sha256sum | cut -c1-16).lock"
  exec 9>"$LOCK"
  flock 9
fi

# --- 1. Debian packages --------------------------------------------------------------------
phase "Debian packages (${DEB_PACKAGES[*]})"
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
# npm: Debian's own package, unless the installed nodejs brings it (NodeSource's does)
command -v npm >/dev/null 2>&1 || missing+=(npm)

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
  say "apt-get install ${missing[*]} (one line per package unpacked)"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
    | sed -un 's/^Unpacking \([^ ]*\).*/install        apt: unpacking \1/p'
else
  say "Debian packages present: ${DEB_PACKAGES[*]}"
fi

# --- 2. virtual environment ----------------------------------------------------------------
phase "Python virtual environment (.venv)"
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); mammo-node needs Python >= 3.11"
  say "creating .venv with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# --- 3. Python packages --------------------------------------------------------------------
phase "Python packages (torch $TORCH_VERSION first, then the project)"
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
    pip_progress "${torch_args[@]}" "torch==$TORCH_VERSION"
  fi
  constraints="$(mktemp)"
  CLEANUP+=("$constraints")
  printf 'torch==%s\n' "$TORCH_VERSION" >"$constraints"
  say "pip install -e '.[dev]' (torch pinned to $TORCH_VERSION)"
  pip_progress -c "$constraints" -e '.[dev]'
fi

# --- 4. verify -----------------------------------------------------------------------------
phase "verify (pip check, torch version)"
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

# --- 5. the viewer: playwright-core + OHIF's static build ----------------------------------
phase "the viewer (playwright-core, OHIF static build) in .viewer"
VIEWER="$ROOT/.viewer"
VIEWER_STAMP="$VIEWER/.mammo-viewer-stamp"
viewer_want="$(cat tools/viewer/package.json tools/viewer/package-lock.json tools/stack/viewer.py \
  | sha256sum | cut -d' ' -f1)"
if [[ "$viewer_want" == "$(cat "$VIEWER_STAMP" 2>/dev/null || true)" ]]; then
  say "viewer up to date (stamp $(cut -c1-12 <<<"$viewer_want"))"
else
  rm -f "$VIEWER_STAMP"
  mkdir -p "$VIEWER"
  cp tools/viewer/package.json tools/viewer/package-lock.json "$VIEWER/"
  say "npm ci (playwright-core) in .viewer"
  (cd "$VIEWER" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null)
  ohif_spec="$("$VENV/bin/python" -c 'import json; o = json.load(open("tools/viewer/package.json"))["mammoNode"]["ohif"]; print(o["package"] + "@" + o["version"], o["integrity"])')"
  read -r ohif_package ohif_integrity <<<"$ohif_spec"
  unpack="$(mktemp -d)"
  CLEANUP_DIRS+=("$unpack")
  say "npm pack $ohif_package (OHIF's static build)"
  (cd "$unpack" && npm pack "$ohif_package" --silent >/dev/null)
  tarball="$(ls "$unpack"/*.tgz)"
  got="$("$VENV/bin/python" -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
  [[ "$got" == "$ohif_integrity" ]] \
    || die "$ohif_package: integrity $got, expected $ohif_integrity (tools/viewer/package.json)"
  tar -xzf "$tarball" -C "$unpack" package/dist
  rm -rf "$VIEWER/ohif"
  mv "$unpack/package/dist" "$VIEWER/ohif"
  "$VENV/bin/python" -m tools.stack.viewer patch --dist "$VIEWER/ohif"
  printf '%s\n' "$viewer_want" >"$VIEWER_STAMP"
fi
say "done: torch $torch_version, $("$VENV/bin/python" -V)"
