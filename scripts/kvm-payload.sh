#!/usr/bin/env bash
# Builds (once) the tiny bootable payload the kvm driver's tests and demo use:
#   $DIR/vmlinux     the Debian kernel, uncompressed (boots ~2x faster under TCG)
#   $DIR/initrd.gz   a busybox-static initramfs whose /init prints
#                    "WSP-VM-READY <hostname>" on the serial console, then waits
#                    (with wsp.tick=1 on the kernel command line it prints
#                    "WSP-TICK n" every second).
# DIR = $WSP_KVM_PAYLOAD, else /var/cache/wsp-kvm-payload. Idempotent: prints
# DIR and exits at once when both files exist. The kernel comes from its
# package (apt-get download + dpkg -x); nothing is installed. Needs
# busybox-static, cpio, python3 (scripts/install-deps.sh installs them).
set -euo pipefail
DIR=${WSP_KVM_PAYLOAD:-/var/cache/wsp-kvm-payload}
if [ -s "$DIR/vmlinux" ] && [ -s "$DIR/initrd.gz" ]; then
  echo "$DIR"
  exit 0
fi
mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
flock -w 300 9 || { echo "kvm-payload: $DIR/.build.lock held for 300 s" >&2; exit 1; }
if [ -s "$DIR/vmlinux" ] && [ -s "$DIR/initrd.gz" ]; then
  echo "$DIR"
  exit 0
fi
for tool in busybox cpio gzip python3 apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "kvm-payload: $tool is missing (run scripts/install-deps.sh)" >&2; exit 1; }
done
BUSYBOX=$(command -v busybox)
if ! file -L "$BUSYBOX" 2>/dev/null | grep -q static && [ -x /bin/busybox ]; then BUSYBOX=/bin/busybox; fi
WORK=$(mktemp -d "$DIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Kernel: the package linux-image-amd64 depends on, downloaded and unpacked.
if [ ! -s "$DIR/vmlinux" ]; then
  PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
  [ -n "$PKG" ] || { echo "kvm-payload: cannot find the kernel package linux-image-amd64 depends on (apt-get update?)" >&2; exit 1; }
  (cd "$WORK" && timeout 300 apt-get download -q "$PKG" >/dev/null) || {
    echo "kvm-payload: apt-get download $PKG failed" >&2; exit 1; }
  dpkg -x "$WORK"/"$PKG"_*.deb "$WORK/pkg"
  VMLINUZ=$(ls "$WORK"/pkg/boot/vmlinuz-* | head -1)
  python3 - "$VMLINUZ" "$WORK/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
if start < 0:
    sys.exit("kvm-payload: no XZ stream in " + sys.argv[1])
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b'\x7fELF':
    sys.exit("kvm-payload: the XZ stream of " + sys.argv[1] + " is not an ELF kernel")
open(sys.argv[2], 'wb').write(elf)
PY
  cp "$VMLINUZ" "$DIR/vmlinuz"
  mv "$WORK/vmlinux" "$DIR/vmlinux"
fi

# 2. Initramfs: busybox + /init, written as newc cpio by cpio(1).
R="$WORK/root"
mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
cat > "$R/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
HN=wspvm TICK=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    wsp.hostname=*) HN="${a#*=}";;
    wsp.tick=*) TICK="${a#*=}";;
  esac
done
hostname "$HN"
echo "WSP-VM-READY $(hostname)"
n=0
if [ "$TICK" = 1 ]; then
  while :; do n=$((n+1)); echo "WSP-TICK $n"; sleep 1; done
fi
while :; do sleep 3600; done
INIT
chmod 755 "$R/init"
if [ "$(id -u)" -eq 0 ]; then mknod -m 600 "$R/dev/console" c 5 1; fi
(cd "$R" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$WORK/initrd.gz"
mv "$WORK/initrd.gz" "$DIR/initrd.gz"
echo "$DIR"
