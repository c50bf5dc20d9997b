#!/bin/sh
# Installs what building and testing hostmesh needs on Debian 12, only when
# something is missing. Run as root.
set -eu

need_pkgs=""
have() { command -v "$1" >/dev/null 2>&1; }
want() { # want COMMAND PACKAGE
    if ! have "$1"; then need_pkgs="$need_pkgs $2"; fi
}
want protoc protobuf-compiler
want nft nftables
want etcd etcd-server
want ip iproute2
want curl curl
want python3 python3
want tcpdump tcpdump
want dpkg-buildpackage dpkg-dev
want getent libc-bin
# `scripts/deps.sh bench`: the load generators and peers the data-plane
# benchmark compares against.
if [ "${1:-}" = bench ]; then
    want wrk wrk
    want iperf3 iperf3
    want nginx nginx-light
    want haproxy haproxy
fi
# The package test (tests/tests/packages.rs) and `make packages`.
want debootstrap debootstrap
want systemd-nspawn systemd-container
want nsenter util-linux
want rpmbuild rpm
want lintian lintian
want strip binutils
# ...and a venv for Ansible (with Debian's python3, as the test uses it).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need_pkgs="$need_pkgs python3-venv"
fi

if [ -n "$need_pkgs" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "deps: missing packages:$need_pkgs; run as root (apt-get install -y$need_pkgs)" >&2
        exit 1
    fi
    echo "deps: installing$need_pkgs"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_pkgs
fi

if ! have cargo; then
    echo "deps: cargo not found. Install Rust 1.90 or newer (https://rustup.rs), then run make again." >&2
    exit 1
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 90 ]; then
    echo "deps: rustc $(rustc --version) is too old; hostmesh needs 1.90 or newer (edition 2024)." >&2
    exit 1
fi
