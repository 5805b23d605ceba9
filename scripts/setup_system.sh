#!/usr/bin/env bash
# System packages the project needs: bubblewrap (code sandbox), slurm-wlm + munge (launcher tests).
# Installs only what is missing, so a second run costs nothing. Needs root (CI runs as root); without root it
# says what is missing and carries on, and the tests that need those tools fail loudly.
set -euo pipefail
# bubblewrap: sandbox; slurm-wlm + munge: launcher tests; shellcheck: launcher script lint; python3-minimal (/usr/bin/python3 runs sandboxed Python),
# nodejs and g++ (sandboxed JavaScript and C++), libseccomp2 (seccomp filter), util-linux (prlimit, setpriv).
packages=(bubblewrap slurm-wlm munge python3-minimal nodejs g++ libseccomp2 util-linux shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_system: missing Debian packages: ${missing[*]} (run as root: apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "setup_system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
