#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing: as root, else with
# passwordless sudo (`sudo -n`, never a prompt). Exits non-zero when it cannot.
# Used by `make install` (redis-server) and .ci/run (sourced, for apt_install / apt_lists).

_apt_sudo() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    echo "not root and no sudo: cannot run $*" >&2
    return 1
  fi
}

# Installed: dpkg's status is "install ok installed", or a binary of that name is on PATH.
# Not `dpkg -s`, which also succeeds for a package removed but not purged ("deinstall ok
# config-files"): its binary is gone, and apt must install it again.
apt_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ] ||
    command -v "$1" >/dev/null 2>&1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do apt_installed "$pkg" || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get here to install ${missing[*]}" >&2; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  _apt_sudo apt-get update -q && _apt_sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# apt's package lists, for `make prometheus` (apt-get download needs them, not root).
apt_lists() {
  apt-cache show "$1" >/dev/null 2>&1 && return 0
  _apt_sudo apt-get update -q
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  apt_install "$@"
fi
