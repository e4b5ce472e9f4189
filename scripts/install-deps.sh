#!/usr/bin/env bash
# Installs the Debian packages the tests and the product use, then checks
# that every command they run is really there.
#
# The commands and their packages are pilot/src/tools.txt (lines needed by
# kvm, tests, slurm, gridengine; not xen: Xen is not installable here).
#   1. install the packages that are not installed (batch systems through
#      scripts/install-lrm.sh);
#   2. verify each command exists (and that QEMU's run);
#   3. for the commands still missing, install their packages again, with
#      this release's own versions pinned: the image may carry newer ones
#      (qemu-utils 10 from backports) that step 1's packages cannot live with
#      (apt removed it to install qemu-system-x86 7.2, and qemu-img vanished);
#   4. verify again; fail naming each missing command and its package.
# Idempotent; one line when everything is there. Needs root (or sudo -n).
#
# Usage: install-deps.sh            install and verify
#        install-deps.sh --check    verify only (no root needed); exit 1 if
#                                   anything is missing
# WSP_TOOLS_TABLE overrides the table (tests of this script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
table=${WSP_TOOLS_TABLE:-$here/../pilot/src/tools.txt}
mode=${1:-install}
case $mode in install | --check) ;; *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac
# Daemons and admin tools live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
say() { echo "install-deps: $*" >&2; }

[ -r "$table" ] || {
    say "cannot read the tools table $table"
    exit 2
}
declare -A package_of
commands=()
while read -r cmd pkg who _; do
    case $cmd in '' | '#'*) continue ;; esac
    case $who in kvm | tests | slurm | gridengine) ;; *) continue ;; esac
    commands+=("$cmd")
    package_of[$cmd]=$pkg
done <"$table"

# Prints "command package" for each command that is missing or broken.
missing_commands() {
    local c
    for c in "${commands[@]}"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "$c ${package_of[$c]}"
            continue
        fi
        case $c in
            # A binary whose libraries do not match (half an upgrade) is as
            # good as missing.
            qemu-img | qemu-system-x86_64)
                timeout 20 "$c" --version >/dev/null 2>&1 || echo "$c ${package_of[$c]}"
                ;;
        esac
    done
}

report_missing() { # $1: what happened; $2: missing_commands' output
    say "$1 (command: package to install):"
    local c p
    while read -r c p; do
        echo "  $c not found: install $p" >&2
    done <<<"$2"
}

if [ "$mode" = --check ]; then
    m=$(missing_commands)
    [ -z "$m" ] && exit 0
    report_missing "missing" "$m"
    exit 1
fi

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
# Wait for another apt (up to 10 min) instead of failing; no overall
# timeout: killing dpkg halfway leaves a worse machine than waiting.
APT=("${SUDO[@]}" apt-get -q -y -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
updated=""
apt_update() {
    [ -n "$updated" ] && return 0
    "${APT[@]}" -qq update
    updated=1
}
installed() { grep -q "install ok installed" <<<"$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)"; }

# 1. Packages not installed at all (the batch systems: install-lrm.sh).
want=()
for c in "${commands[@]}"; do
    p=${package_of[$c]}
    case " ${want[*]} " in *" $p "*) continue ;; esac
    want+=("$p")
done
first=()
for p in "${want[@]}"; do
    case $p in slurm* | munge | gridengine-*) continue ;; esac
    installed "$p" || first+=("$p")
done
if [ ${#first[@]} -gt 0 ]; then
    say "installing: ${first[*]}"
    apt_update
    "${APT[@]}" -qq install "${first[@]}" >/dev/null
fi
"${SUDO[@]}" "$here/install-lrm.sh" all

# 2. Verify.
m=$(missing_commands)
[ -z "$m" ] && {
    echo "install-deps: all ${#commands[@]} commands present"
    exit 0
}

# 3. Second pass: the packages of the missing commands, at this release's
# version (Debian 12: bookworm, bookworm-updates or bookworm-security; never
# backports), downgrading what the image carries if need be.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
release_version() { # the newest version of $1 from this release's suites
    local best="" v
    while IFS='|' read -r _ v src; do
        v=${v// /}
        case $src in *backports*) continue ;; esac
        [[ $src =~ \ $codename(-updates|-security)?/ ]] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done < <(apt-cache madison "$1" 2>/dev/null)
    echo "$best"
}
apt_update
second=()
while read -r c p; do
    case " ${second[*]} " in *" $p="* | *" $p "*) continue ;; esac
    v=""
    [ -n "$codename" ] && v=$(release_version "$p")
    if [ -n "$v" ]; then second+=("$p=$v"); else second+=("$p"); fi
done <<<"$m"
say "still missing: $(cut -d' ' -f1 <<<"$m" | tr '\n' ' ')"
say "installing again, pinned to ${codename:-this release}'s versions: ${second[*]}"
"${APT[@]}" -qq install --reinstall --allow-downgrades "${second[@]}" >/dev/null

# 4. Verify again.
m=$(missing_commands)
if [ -n "$m" ]; then
    report_missing "still missing after two passes" "$m"
    exit 1
fi
echo "install-deps: all ${#commands[@]} commands present (second pass: ${second[*]})"
