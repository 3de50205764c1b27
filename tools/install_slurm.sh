#!/usr/bin/env bash
# Install the Slurm daemons, client and munge from the distribution's packages, for the local test cluster
# (tests/helpers/slurm_cluster.py). Idempotent and noninteractive; needs root (or sudo). Debian 12 ships Slurm 22.05.8,
# the version the harness was measured with: we pin to it where the package index has it, and otherwise take the
# distribution's version with a warning (newer Slurm releases are expected to work with the same config).
set -euo pipefail

SLURM_VERSION="${SLURM_VERSION:-22.05.8}"   # prefix of the Debian version, e.g. 22.05.8-4+deb12u3
MUNGE_VERSION="${MUNGE_VERSION:-0.5.15}"
PACKAGES=(slurmctld slurmd slurm-client munge)

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

if have_all; then
    echo "install_slurm: already installed: $(slurmctld -V)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "install_slurm: need root or sudo to apt-get install" >&2; exit 1; }
    SUDO="sudo"
fi
command -v apt-get >/dev/null || { echo "install_slurm: no apt-get; install ${PACKAGES[*]} by hand" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# An index that has never been fetched has no candidates at all: refresh it then (and only then, to stay fast).
if ! apt-cache show slurmd >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi

# Full version strings available in the index that start with the pinned prefix (first one wins).
pick() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -m1 "^$2" || true; }

specs=()
for pkg in "${PACKAGES[@]}"; do
    want="$SLURM_VERSION"
    [ "$pkg" = munge ] && want="$MUNGE_VERSION"
    version="$(pick "$pkg" "$want")"
    if [ -n "$version" ]; then
        specs+=("$pkg=$version")
    else
        echo "install_slurm: warning: $pkg $want* not in the package index; installing the available version" >&2
        specs+=("$pkg")
    fi
done

$SUDO apt-get install -y -qq --no-install-recommends "${specs[@]}"
have_all || { echo "install_slurm: packages installed but Slurm binaries missing from PATH" >&2; exit 1; }
echo "install_slurm: installed: $(slurmctld -V)"
