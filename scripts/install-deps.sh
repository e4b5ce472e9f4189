#!/usr/bin/env bash
# Installs the Debian packages the tests use, if missing: the batch systems
# (Slurm + munge, Grid Engine: scripts/install-lrm.sh) and the other tools
# listed below. Idempotent; needs root (or passwordless sudo).
set -euo pipefail
here=$(dirname "$0")
want=(qemu-system-x86 qemu-utils zstd busybox-static cpio iproute2 dnsmasq-base nftables dosfstools mtools
      systemd man-db)  # systemd-analyze/-sysusers/-tmpfiles and man: the packaging test
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
$SUDO "$here/install-lrm.sh" all
echo "packages present"
