#!/bin/bash
# Builds OpenPBS and/or Torque from their source tarballs into a prefix
# outside the repo, for the real-server tests. Skips a flavour whose prefix
# already holds a complete build of the same tarball.
#
# usage: pbs-build.sh deps|openpbs|torque|all
#        pbs-build.sh source openpbs|torque   (prints the tarball; exit 3: none)
#   deps     apt-get installs the build and runtime packages that are missing
#            (changes system packages: run it under flock /tmp/wsp-system.lock)
#   openpbs  build + install OpenPBS into $WSP_LRM_PREFIX/openpbs
#   torque   build + install Torque into $WSP_LRM_PREFIX/torque
#   all      deps, then both
# Exit 3 when the tarball of a flavour is nowhere to be found (nothing built).
#
# env (defaults):
#   WSP_LRM_PREFIX=/opt/wsp-lrm      prefixes <this>/openpbs and <this>/torque,
#                                    build trees in <this>/build
#   WSP_OPENPBS_TARBALL, WSP_TORQUE_TARBALL
#                                    the source tarballs; default: the one in
#                                    shared/lrm/{openpbs,torque}/ beside the repo
#                                    (or beside one of its parent folders)
#   JOBS=$(nproc)  NICE=19  FORCE=0 (1: rebuild even when built)
#
# Nothing is written to /etc or /usr: OpenPBS's profile.d file and systemd unit
# go into its prefix; Torque is installed through a staging DESTDIR and only
# its prefix is copied out (its profile.d file would put its qsub ahead of
# Grid Engine's; its init.d and ld.so.conf.d files are not needed: the
# binaries find libtorque through their RUNPATH). Torque's server home
# template (server_name, pbs_environment, mom_priv, ...) is kept in
# <prefix>/share/server-home; scripts/pbs-up.sh copies it into place.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
ROOT=${WSP_LRM_PREFIX:-/opt/wsp-lrm}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-19}
say() { echo "pbs-build: $*" >&2; }
die() { say "$*"; exit 1; }

# A clean PATH: a pyenv/conda python3 first on PATH would be linked into
# OpenPBS's pbs_python; the system toolchain only.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The tarball of a flavour: $WSP_<F>_TARBALL, else shared/lrm/<f>/*.tar.gz
# beside the repo or beside one of its parents (a worktree in a subfolder).
tarball() {
    local f=$1 var d
    var="WSP_$(echo "$f" | tr a-z A-Z)_TARBALL"
    if [ -n "${!var:-}" ]; then
        [ -f "${!var}" ] || die "$var=${!var}: no such file"
        echo "${!var}"
        return 0
    fi
    d=$repo
    while [ "$d" != / ]; do
        d=$(dirname "$d")
        for t in "$d"/shared/lrm/"$f"/*.tar.gz; do
            [ -f "$t" ] && { echo "$t"; return 0; }
        done
    done
    return 1
}

OPENPBS_DEPS="gcc g++ make libtool autoconf automake pkg-config libhwloc-dev libx11-dev libxt-dev
    libedit-dev libical-dev libncurses-dev python3-dev tcl-dev tk-dev swig libexpat1-dev
    libssl-dev libxext-dev libxft-dev libcjson-dev libpq-dev postgresql postgresql-contrib"
# Torque's configure made by Debian's autoconf 2.71 fails its pthread check
# (it links C tests with g++): regenerated with autoconf2.69.
TORQUE_DEPS="gcc g++ make libtool autoconf2.69 automake pkg-config libboost-dev libxml2-dev
    zlib1g-dev libssl-dev libhwloc-dev"
RUNTIME_DEPS="iproute2 util-linux bc"

deps() {
    local missing="" p
    # shellcheck disable=SC2086
    for p in $OPENPBS_DEPS $TORQUE_DEPS $RUNTIME_DEPS; do
        grep -q "ok installed" <<<"$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" || missing="$missing $p"
    done
    [ -z "$missing" ] && { say "build packages present"; return 0; }
    say "installing:$missing"
    apt-get update -qq
    # Never let apt remove anything (sendmail-bin would remove exim4, for one:
    # it is left out on purpose) or upgrade what is installed.
    # shellcheck disable=SC2086
    if grep -q '^Remv' <<<"$(apt-get install -s --no-upgrade --no-install-recommends $missing 2>/dev/null)"; then
        apt-get install -s --no-upgrade --no-install-recommends $missing | grep '^Remv' >&2
        die "apt-get would remove packages: not installing"
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade --no-install-recommends $missing >/dev/null
}

# Unpacks tarball $1 into a fresh $ROOT/build/<name>-<id>; prints the source dir.
unpack() {
    local tb=$1 name=$2 id=$3 dir top
    dir=$ROOT/build/$name-$id
    if [ ! -f "$dir/.unpacked" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        tar -xzf "$tb" -C "$dir"
        touch "$dir/.unpacked"
    fi
    top=$(find "$dir" -mindepth 1 -maxdepth 1 -type d | sed -n 1p)
    [ -n "$top" ] && [ -f "$top/configure.ac" ] || top=$dir
    [ -f "$top/configure.ac" ] || die "$tb: no configure.ac inside"
    echo "$top"
}

built() { # prefix id binaries...
    local p=$1 id=$2 b
    shift 2
    [ "${FORCE:-0}" != 1 ] && [ -f "$p/.wsp-build-stamp" ] && [ "$(cat "$p/.wsp-build-stamp")" = "$id" ] || return 1
    for b in "$@"; do [ -x "$p/$b" ] || return 1; done
}

build_openpbs() {
    local tb id p src t0
    tb=$(tarball openpbs) || { say "openpbs: no source tarball (set WSP_OPENPBS_TARBALL)"; return 3; }
    id=$(sha256sum "$tb" | cut -c1-16)
    p=$ROOT/openpbs
    if built "$p" "$id" sbin/pbs_server.bin bin/qsub bin/qstat bin/qdel bin/pbsdsh; then
        say "openpbs: $p already built from $(basename "$tb"), skipping"
        return 0
    fi
    src=$(unpack "$tb" openpbs "$id")
    say "openpbs: building $(basename "$tb") into $p (about 3-4 min on 2 cores)"
    t0=$SECONDS
    mkdir -p "$p"
    (
        cd "$src"
        [ -x configure ] || nice -n "$NICE" ./autogen.sh >build.log 2>&1
        nice -n "$NICE" ./configure --prefix="$p" --with-python=/usr >>build.log 2>&1
        nice -n "$NICE" make -j"$JOBS" >>build.log 2>&1
        # profile.d and the systemd unit default to /etc and /usr: keep them in the prefix
        nice -n "$NICE" make install sysprofiledir="$p/etc/profile.d" unitfiledir="$p/lib/systemd" >>build.log 2>&1
    ) || { tail -n 30 "$src/build.log" >&2; die "openpbs: build failed (log: $src/build.log)"; }
    # authentication of non-root clients (resvport) and pbs_rcp need setuid root
    chmod 4755 "$p/sbin/pbs_iff" "$p/sbin/pbs_rcp"
    echo "$id" >"$p/.wsp-build-stamp"
    rm -rf "$ROOT/build/openpbs-$id" # the build tree (180 MB) is not needed any more
    say "openpbs: built in $((SECONDS - t0)) s, $(du -sh "$p" | cut -f1) in $p"
}

build_torque() {
    local tb id p src stage t0 home=/var/spool/wsp-torque
    tb=$(tarball torque) || { say "torque: no source tarball (set WSP_TORQUE_TARBALL)"; return 3; }
    id=$(sha256sum "$tb" | cut -c1-16)
    p=$ROOT/torque
    if built "$p" "$id" sbin/pbs_server sbin/pbs_mom sbin/pbs_sched sbin/trqauthd bin/qsub bin/pbsdsh; then
        say "torque: $p already built from $(basename "$tb"), skipping"
        return 0
    fi
    src=$(unpack "$tb" torque "$id")
    say "torque: building $(basename "$tb") into $p (about 9-10 min on 2 cores)"
    t0=$SECONDS
    stage=$ROOT/build/torque-stage
    rm -rf "$stage" "$p"
    (
        cd "$src"
        if [ ! -x configure ] || [ ! -f .wsp-autoconf269 ]; then
            { libtoolize -c -f && aclocal && autoconf2.69 -f && autoheader2.69 -f && automake -a -c -f; } >build.log 2>&1
            touch .wsp-autoconf269
        fi
        # -Werror and C++17 ("ISO C++17 does not allow 'register'") break gcc 12
        nice -n "$NICE" ./configure --prefix="$p" --with-server-home="$home" --disable-gui \
            --with-default-server=pbshost --disable-gcc-warnings \
            CFLAGS="-g -O2" CXXFLAGS="-g -O2 -std=gnu++14" >>build.log 2>&1
        nice -n "$NICE" make -j"$JOBS" >>build.log 2>&1
        # FROM_MAKE_PACKAGES=1: no ldconfig on the host
        nice -n "$NICE" make install DESTDIR="$stage" FROM_MAKE_PACKAGES=1 >>build.log 2>&1
    ) || { tail -n 30 "$src/build.log" >&2; die "torque: build failed (log: $src/build.log)"; }
    mkdir -p "$p"
    cp -a "$stage$p/." "$p/"
    if [ -d "$stage$home" ]; then
        mkdir -p "$p/share"
        rm -rf "$p/share/server-home"
        cp -a "$stage$home" "$p/share/server-home"
    fi
    rm -rf "$stage"
    # without ld.so.conf.d the binaries must find libtorque by their RUNPATH
    if grep -q 'not found' <<<"$(LD_LIBRARY_PATH='' ldd "$p/bin/qsub")"; then
        die "torque: $p/bin/qsub does not find its libraries: $(ldd "$p/bin/qsub" | grep 'not found')"
    fi
    echo "$id" >"$p/.wsp-build-stamp"
    rm -rf "$ROOT/build/torque-$id" # the build tree (290 MB) is not needed any more
    say "torque: built in $((SECONDS - t0)) s, $(du -sh "$p" | cut -f1) in $p"
}

case ${1:-} in
    source) tarball "${2:?openpbs or torque}" || exit 3 ;;
    deps) deps ;;
    openpbs) build_openpbs ;;
    torque) build_torque ;;
    all)
        if ! tarball openpbs >/dev/null 2>&1 && ! tarball torque >/dev/null 2>&1; then
            say "no OpenPBS or Torque source tarball: nothing to build (their tests will say they are skipped)"
            exit 3
        fi
        deps
        rc=0
        build_openpbs || rc=$?
        build_torque || rc=$?
        exit $rc
        ;;
    *)
        echo "usage: $0 deps|openpbs|torque|all" >&2
        exit 2
        ;;
esac
