#!/usr/bin/env bash
# Installs Debian's fortunes packages (real English, German and Chinese text for the demo and its tests)
# when they are missing. Needs apt-get and root (or sudo); otherwise prints the command and returns 1.
set -uo pipefail
PACKAGES=(fortunes fortunes-min fortunes-de fortunes-zh)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "installing ${missing[*]} (apt-get)" >&2
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null && exit 0
fi
echo "missing text packages; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
exit 1
