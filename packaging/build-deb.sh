#!/bin/sh
# Builds the two Debian packages into target/debian/:
#   workspace-coordinator  (head node: workspace-coordinator, workspace, the systemd unit)
#   workspace-pilot        (batch nodes: workspace-pilot, workspace-kill-all, tmpfiles.d)
# Needs cargo-deb (`cargo install cargo-deb`). Man pages and shell
# completions are generated from the binaries' own CLI definitions first.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
out=packaging/generated
rm -rf "$out"
mkdir -p "$out/man" "$out/completions/bash" "$out/completions/zsh" "$out/completions/fish"
for b in workspace workspace-coordinator; do
    "target/release/$b" man --dir "$out/man" >/dev/null
    "target/release/$b" completions bash >"$out/completions/bash/$b"
    "target/release/$b" completions zsh >"$out/completions/zsh/_$b"
    "target/release/$b" completions fish >"$out/completions/fish/$b.fish"
done
# The node package's pages apart, so the two packages never ship one file.
mkdir -p "$out/man-pilot"
target/release/workspace-pilot man --dir "$out/man-pilot" >/dev/null
target/release/workspace-kill-all --man "$out/man-pilot" >/dev/null
cargo deb -p wsp-coordinator --no-build
cargo deb -p wsp-pilot --no-build
ls -l target/debian/*.deb
