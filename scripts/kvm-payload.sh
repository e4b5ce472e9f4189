#!/usr/bin/env bash
# Builds (once) the tiny bootable payload the kvm driver's tests and demo use:
#   $DIR/vmlinux     the Debian kernel, uncompressed (boots ~2x faster under TCG)
#   $DIR/initrd.gz   a busybox-static initramfs whose /init prints
#                    "WSP-VM-READY <hostname>" on the serial console, then waits
#                    (with wsp.tick=1 on the kernel command line it prints
#                    "WSP-TICK n" every second).
#   With wsp.count=1 it prints "WSP-COUNT <boot id> <n>" every half second
#   (the boot id is the kernel's random one: a rebooted guest has another).
#   With wsp.disk=1 it mounts the vfat disk labelled WSPDATA read-write,
#   writes "<boot id>" to its wsp-file once (printing "WSP-FILE-WRITTEN
#   <boot id>"), and with wsp.count=1 prints "WSP-DISK <contents>" every 5
#   counts, read back after dropping the page cache.
#   With wsp.fill=<MB> it first fills a tmpfs with that much random data
#   ("WSP-FILLED <MB>"): guest memory that is neither zero nor compressible.
#   With wsp.net=1 the init also loads virtio net/blk + vfat modules, runs
#   udhcpc on every ethN, mounts the NoCloud seed (label cidata) and prints
#   "WSP-NET <hostname> <ip,...>", "WSP-PEER <name> <group> <ips>" for each
#   line of the seed's wsp-peers, and "WSP-PING <peer> ok|FAIL" for each
#   peer's first address; with wsp.spoof=<hostname>, that VM then changes its
#   IP, then its MAC, and prints "WSP-SPOOF ip|mac reached=<n>".
#   With wsp.burn=1 it spins after the marker (a guest that wants a whole
#   CPU: the CPU-cap tests).
#   With wsp.warm=1 (a warm image: its clean snapshot is taken at the
#   marker) the modules are loaded first and /bin/wsp-hotplug handles what
#   a warm start plugs in after the restore: when a NoCloud seed (label
#   cidata) appears it sets the hostname, waits for the NICs the seed's
#   network-config names and runs udhcpc on them, records the hostname in
#   memory (/tmp/wsp-users) and, with wsp.disk=1, in a file on the disk
#   (wsp-user-<hostname>), then prints "WSP-IDENTITY <hostname> <ips>",
#   "WSP-USERS <hostnames in memory>" and "WSP-FILES <files on the disk>".
# DIR = $WSP_KVM_PAYLOAD, else /var/cache/wsp-kvm-payload/v<VERSION> (one
# directory per version, so checkouts of different versions on one host
# never rebuild each other's). Idempotent: prints DIR and exits at once when
# the files of this payload VERSION exist. The kernel comes from its
# package (apt-get download + dpkg -x), or from an older payload's directory
# above DIR when it has one; nothing is installed. Needs
# busybox-static, cpio, python3 (scripts/install-deps.sh installs them).
set -euo pipefail
VERSION=5   # bump when the initramfs changes: a new directory is built
DIR=${WSP_KVM_PAYLOAD:-/var/cache/wsp-kvm-payload/v$VERSION}
ready() { [ -s "$DIR/vmlinux" ] && [ -s "$DIR/initrd.gz" ] && [ "$(cat "$DIR/VERSION" 2>/dev/null)" = "$VERSION" ]; }
if ready; then
  echo "$DIR"
  exit 0
fi
mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
flock -w 300 9 || { echo "kvm-payload: $DIR/.build.lock held for 300 s" >&2; exit 1; }
if ready; then
  echo "$DIR"
  exit 0
fi
for tool in busybox cpio gzip python3 apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "kvm-payload: $tool is missing (run scripts/install-deps.sh)" >&2; exit 1; }
done
BUSYBOX=$(command -v busybox)
if ! grep -q static <<<"$(file -L "$BUSYBOX" 2>/dev/null)" && [ -x /bin/busybox ]; then BUSYBOX=/bin/busybox; fi
WORK=$(mktemp -d "$DIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Kernel (and its modules for the guest's network and seed disk): the
#    package linux-image-amd64 depends on, downloaded and unpacked (or the
#    same files of an older payload version in the directory above).
UP=$(dirname "$DIR")
if [ ! -s "$DIR/vmlinux" ] && [ -s "$UP/vmlinux" ] && [ -s "$UP/vmlinuz" ] && [ -s "$UP/modules/load.order" ]; then
  cp "$UP/vmlinuz" "$DIR/vmlinuz"
  rm -rf "$DIR/modules"; cp -r "$UP/modules" "$DIR/modules"
  cp "$UP/vmlinux" "$DIR/vmlinux.new" && mv "$DIR/vmlinux.new" "$DIR/vmlinux"
fi
if [ ! -s "$DIR/vmlinux" ] || [ ! -s "$DIR/modules/load.order" ]; then
  PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | sed -n 1p)
  [ -n "$PKG" ] || { echo "kvm-payload: cannot find the kernel package linux-image-amd64 depends on (apt-get update?)" >&2; exit 1; }
  (cd "$WORK" && timeout 300 apt-get download -q "$PKG" >/dev/null) || {
    echo "kvm-payload: apt-get download $PKG failed" >&2; exit 1; }
  dpkg -x "$WORK"/"$PKG"_*.deb "$WORK/pkg"
  # Modules in insmod order, dependencies resolved from their .modinfo.
  rm -rf "$DIR/modules.new"; mkdir -p "$DIR/modules.new"
  python3 - "$WORK/pkg/lib/modules" "$DIR/modules.new" virtio_pci virtio_net virtio_blk vfat nls_cp437 nls_ascii <<'PY'
import os, shutil, struct, sys
moddir, out, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
def modinfo(path):
    d = open(path, 'rb').read()
    shoff = struct.unpack_from('<Q', d, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', d, 0x3A)
    secs = [struct.unpack_from('<IIQQQQIIQQ', d, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx]
    def name(off):
        s = d[strtab[4] + off:]
        return s[:s.index(b'\0')].decode()
    for s in secs:
        if name(s[0]) == '.modinfo':
            raw = d[s[4]:s[4] + s[5]].decode(errors='replace')
            return dict(kv.split('=', 1) for kv in raw.split('\0') if '=' in kv)
    return {}
index = {}
for root, _, files in os.walk(moddir):
    for f in files:
        if f.endswith('.ko'):
            index[f[:-3].replace('-', '_')] = os.path.join(root, f)
order, seen = [], set()
def visit(m):
    m = m.replace('-', '_')
    if m in seen:
        return
    seen.add(m)
    if m not in index:
        return  # built in
    for dep in filter(None, modinfo(index[m]).get('depends', '').split(',')):
        visit(dep)
    order.append(index[m])
for m in wanted:
    visit(m)
with open(os.path.join(out, 'load.order'), 'w') as lo:
    for p in order:
        shutil.copy(p, out)
        lo.write(os.path.basename(p) + '\n')
PY
  rm -rf "$DIR/modules"; mv "$DIR/modules.new" "$DIR/modules"
fi
if [ ! -s "$DIR/vmlinux" ]; then
  VMLINUZ=$(ls "$WORK"/pkg/boot/vmlinuz-* | sed -n 1p)
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
mkdir -p "$R/lib/modules" "$R/etc" "$R/seed"
cp "$DIR"/modules/* "$R/lib/modules/"
cat > "$R/etc/udhcpc.script" <<'UDHCPC'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface" 2>/dev/null
    ;;
esac
exit 0
UDHCPC
chmod 755 "$R/etc/udhcpc.script"
cat > "$R/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
HN=wspvm TICK=0 NET=0 SPOOF= COUNT=0 DISK=0 FILL=0 BURN=0 WARM=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    wsp.hostname=*) HN="${a#*=}";;
    wsp.tick=*) TICK="${a#*=}";;
    wsp.count=*) COUNT="${a#*=}";;
    wsp.disk=*) DISK="${a#*=}";;
    wsp.fill=*) FILL="${a#*=}";;
    wsp.net=*) NET="${a#*=}";;
    wsp.spoof=*) SPOOF="${a#*=}";;
    wsp.burn=*) BURN="${a#*=}";;
    wsp.warm=*) WARM="${a#*=}";;
  esac
done
reach() {  # reach IP...: how many answer a ping
  n=0; for p in "$@"; do ping -c 1 -W 1 "$p" >/dev/null 2>&1 && n=$((n+1)); done; echo $n
}
if [ "$NET" = 1 ] || [ "$DISK" = 1 ] || [ "$WARM" = 1 ]; then
  while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/load.order
fi
if [ "$NET" = 1 ]; then
  DEV=
  for i in 1 2 3 4 5 6 7 8 9 10; do
    DEV=$(findfs LABEL=cidata 2>/dev/null) && break; sleep 0.2
  done
  if mount -t vfat -o ro "${DEV:-/dev/vda}" /seed 2>/dev/null; then
    LHN=$(sed -n 's/^local-hostname:[[:space:]]*//p' /seed/meta-data | tr -d '\r"')
    [ -n "$LHN" ] && HN="$LHN"
  else
    echo "WSP-SEED-FAIL ${DEV:-/dev/vda}"
  fi
  hostname "$HN"
  ip link set lo up
  IPS=
  for d in /sys/class/net/eth*; do
    [ -e "$d" ] || continue
    i=${d##*/}
    ip link set "$i" up
    if udhcpc -i "$i" -n -q -f -t 5 -T 2 -s /etc/udhcpc.script >/dev/null 2>&1; then
      IPS="$IPS${IPS:+,}$(ip -4 -o addr show dev "$i" | awk '{print $4}' | cut -d/ -f1)"
    fi
  done
  echo "WSP-NET $HN ${IPS:-none}"
  PEERS=
  if [ -f /seed/wsp-peers ]; then
    while read -r name group ips; do
      echo "WSP-PEER $name $group $ips"
      [ "$name" = "$HN" ] || PEERS="$PEERS ${ips%%,*}"
    done < /seed/wsp-peers
  fi
  for p in $PEERS; do   # peers may still be booting: retry for a while
    ok=FAIL
    for t in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
      ping -c 1 -W 1 "$p" >/dev/null 2>&1 && { ok=ok; break; }
    done
    echo "WSP-PING $p $ok"
  done
  if [ -n "$SPOOF" ] && [ "$SPOOF" = "$HN" ]; then
    sleep 12   # let the peers finish pinging us first
    MINE=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
    ip addr flush dev eth0; ip addr add 10.77.0.250/24 dev eth0
    echo "WSP-SPOOF ip reached=$(reach $PEERS)"
    ip addr flush dev eth0; ip addr add "$MINE" dev eth0
    ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:01; ip link set eth0 up
    echo "WSP-SPOOF mac reached=$(reach $PEERS)"
  fi
fi
hostname "$HN"
BOOT=$(cat /proc/sys/kernel/random/boot_id)
if [ "$DISK" = 1 ]; then
  mkdir -p /disk
  DEV=
  for i in 1 2 3 4 5 6 7 8 9 10; do
    DEV=$(findfs LABEL=WSPDATA 2>/dev/null) && break; sleep 0.2
  done
  if mount -t vfat -o rw "${DEV:-/dev/vda}" /disk; then
    if [ ! -s /disk/wsp-file ]; then
      echo "$BOOT" > /disk/wsp-file && sync && echo "WSP-FILE-WRITTEN $BOOT"
    fi
  else
    echo "WSP-DISK-FAIL ${DEV:-/dev/vda}"
  fi
fi
if [ "$FILL" -gt 0 ] 2>/dev/null; then
  mkdir -p /fill
  mount -t tmpfs -o size="${FILL}m" tmpfs /fill
  head -c "${FILL}m" /dev/urandom > /fill/data
  echo "WSP-FILLED $FILL"
fi
if [ "$WARM" = 1 ]; then
  : > /tmp/wsp-users
  uevent /bin/wsp-hotplug &
fi
echo "WSP-VM-READY $(hostname)"
if [ "$BURN" = 1 ]; then
  while :; do :; done
fi
n=0
if [ "$COUNT" = 1 ]; then
  while :; do
    n=$((n+1))
    echo "WSP-COUNT $BOOT $n"
    if [ "$DISK" = 1 ] && [ $((n % 5)) = 0 ]; then
      echo 3 > /proc/sys/vm/drop_caches
      echo "WSP-DISK $(cat /disk/wsp-file 2>&1)"
    fi
    sleep 0.5
  done
fi
if [ "$TICK" = 1 ]; then
  while :; do n=$((n+1)); echo "WSP-TICK $n"; sleep 1; done
fi
while :; do sleep 3600; done
INIT
chmod 755 "$R/init"
cat > "$R/bin/wsp-hotplug" <<'HOTPLUG'
#!/bin/sh
# `uevent` runs this for every uevent once a warm image is ready (see
# the header of scripts/kvm-payload.sh): a seed plugged in after a warm
# start gives the guest its new identity.
[ "$ACTION" = add ] && [ "$SUBSYSTEM" = block ] && [ -n "$DEVNAME" ] || exit 0
exec </dev/null >/dev/console 2>&1
PATH=/bin
DEV=/dev/$DEVNAME
# The device may not answer yet when its event comes: ask for 2 s.
SEED=
for i in $(seq 1 20); do
  [ "$(findfs LABEL=cidata 2>/dev/null)" = "$DEV" ] && SEED=1 && break
  sleep 0.1
done
[ -n "$SEED" ] || exit 0
M=/tmp/seed.$$
mkdir -p "$M"
mount -t vfat -o ro "$DEV" "$M" || { echo "WSP-SEED-FAIL $DEV"; exit 0; }
HN=$(sed -n 's/^local-hostname:[[:space:]]*//p' "$M/meta-data" | tr -d '\r"')
[ -n "$HN" ] && hostname "$HN"
IPS=
for mac in $(sed -n 's/.*"macaddress": *"\([^"]*\)".*/\1/p' "$M/network-config"); do
  IF=
  for t in $(seq 1 50); do
    for d in /sys/class/net/*; do
      [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && IF=${d##*/} && break 2
    done
    sleep 0.1
  done
  [ -n "$IF" ] || { echo "WSP-NIC-MISSING $mac"; continue; }
  ip link set "$IF" up
  if udhcpc -i "$IF" -n -q -f -t 5 -T 2 -s /etc/udhcpc.script >/dev/null 2>&1; then
    IPS="$IPS${IPS:+,}$(ip -4 -o addr show dev "$IF" | awk '{print $4}' | cut -d/ -f1)"
  fi
done
umount "$M"; rmdir "$M"
echo "$(hostname)" >> /tmp/wsp-users
if grep -q ' /disk ' /proc/mounts; then
  echo "$(hostname)" > "/disk/wsp-user-$(hostname)" && sync
fi
echo "WSP-IDENTITY $(hostname) ${IPS:-none}"
echo "WSP-USERS $(tr '\n' ' ' < /tmp/wsp-users)"
grep -q ' /disk ' /proc/mounts && echo "WSP-FILES $(ls /disk | tr '\n' ' ')"
exit 0
HOTPLUG
chmod 755 "$R/bin/wsp-hotplug"
if [ "$(id -u)" -eq 0 ]; then mknod -m 600 "$R/dev/console" c 5 1; fi
(cd "$R" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$WORK/initrd.gz"
mv "$WORK/initrd.gz" "$DIR/initrd.gz"
echo "$VERSION" > "$DIR/VERSION"
echo "$DIR"
