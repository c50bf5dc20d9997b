#!/bin/sh
# Builds the four hostmesh packages: meshd and mesh-controller (which carries
# meshctl), each as a .deb (cargo-deb) and an .rpm (rpmbuild with the specs
# in packaging/rpm; cargo-generate-rpm would add ~5 minutes of build on two
# cores for the same result).
#
#   packaging/build.sh [--profile PROFILE] [--out DIR] [--no-build] [--fast]
#
#   --profile   cargo profile whose binaries are packaged (default: release)
#   --out       where the packages go (default: target/packages)
#   --no-build  package the binaries already in target/PROFILE-DIR
#   --fast      light compression (the package test; not for release)
#
# `make packages` runs it with the defaults. The package test
# (tests/tests/packages.rs) packages the dev binaries it already has with
# --profile dev --no-build --fast. Run from anywhere; needs cargo-deb
# (packaging/tools.sh installs it when missing), rpmbuild (Debian package
# `rpm`), dpkg-shlibdeps (`dpkg-dev`) and strip (`binutils`).
set -eu

die() { echo "packaging/build.sh: $*" >&2; exit 1; }

profile=release
out=
build=yes
fast=no
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || die "--profile needs a value"; profile=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
        --no-build) build=no; shift ;;
        --fast) fast=yes; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
case "$target_dir" in /*) ;; *) target_dir=$repo/$target_dir ;; esac
[ -n "$out" ] || out=$target_dir/packages
mkdir -p "$out"
out=$(cd "$out" && pwd)
case "$profile" in
    dev|test) bin_dir=$target_dir/debug ;;
    *) bin_dir=$target_dir/$profile ;;
esac

command -v rpmbuild >/dev/null 2>&1 || die "rpmbuild is missing: apt-get install rpm (or run scripts/deps.sh)"
command -v dpkg-shlibdeps >/dev/null 2>&1 || die "dpkg-shlibdeps is missing: apt-get install dpkg-dev (or run scripts/deps.sh)"
command -v strip >/dev/null 2>&1 || die "strip is missing: apt-get install binutils (or run scripts/deps.sh)"
"$repo/packaging/tools.sh"

version=$(cargo pkgid -p hostmesh-meshd | sed 's/.*[@#]//')
case "$version" in [0-9]*) ;; *) die "could not read the version from Cargo.toml (got '$version')" ;; esac
# Debian wants the changelog's top entry to be the package's version.
for pkg in meshd mesh-controller; do
    top=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "packaging/deb/$pkg/changelog")
    [ "$top" = "$version-1" ] || die "packaging/deb/$pkg/changelog starts at $top, but the package is $version-1: add an entry (dch -v $version-1)"
done

if [ "$build" = yes ]; then
    # meshd on its own: built together with the controller, cargo would
    # unify tokio's features and link the multi-thread scheduler (and with
    # it libm, ~0.5 MiB of RSS) into meshd, which never uses it.
    cargo build --locked --profile "$profile" -p hostmesh-controller --bins
    cargo build --locked --profile "$profile" -p hostmesh-meshd --bins
    if readelf -d "$bin_dir/meshd" | grep -q 'libm\.so'; then
        die "$bin_dir/meshd links libm: it was built with the rest of the workspace (see docs/PACKAGING.md)"
    fi
fi
for b in meshd mesh-controller meshctl; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it first (cargo build --profile $profile --bins), or drop --no-build"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/hostmesh-packages.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# cargo-deb packages target/release/* (and refuses the dev profile). For any
# other profile, show it a target directory whose release/ holds that
# profile's binaries; the cargo-deb documentation promises it follows
# CARGO_TARGET_DIR.
deb_target=$target_dir
if [ "$bin_dir" != "$target_dir/release" ]; then
    deb_target=$work/target
    mkdir -p "$deb_target/release"
    for b in meshd mesh-controller meshctl; do
        ln -s "$bin_dir/$b" "$deb_target/release/$b"
    done
fi
deb_flags="--no-build --locked --strip -o $out"
[ "$fast" = yes ] && deb_flags="$deb_flags --fast"
for crate in hostmesh-meshd hostmesh-controller; do
    # shellcheck disable=SC2086 # deb_flags is a list of words
    CARGO_TARGET_DIR=$deb_target cargo deb -q -p "$crate" $deb_flags >/dev/null ||
        die "cargo deb -p $crate failed"
done

# RPMs: stripped copies of the same binaries (rpmbuild on Debian has no
# brp-strip step), payload zstd (RHEL 8+), or gzip -1 with --fast.
mkdir -p "$work/bin" "$work/rpm"
for b in meshd mesh-controller meshctl; do
    # As cargo-deb strips the .deb binaries (Debian's dh_strip does the same).
    strip --strip-unneeded --remove-section=.comment --remove-section=.note \
        -o "$work/bin/$b" "$bin_dir/$b"
done
payload=w19.zstdio
[ "$fast" = yes ] && payload=w1.gzdio
for spec in meshd mesh-controller; do
    rpmbuild -bb --quiet \
        --define "_topdir $work/rpm" \
        --define "_rpmdir $out" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --define "_binary_payload $payload" \
        --define "__os_install_post %{nil}" \
        --define "hm_version $version" \
        --define "hm_src $repo" \
        --define "hm_bin $work/bin" \
        "packaging/rpm/$spec.spec" >/dev/null || die "rpmbuild $spec.spec failed"
done

arch=$(dpkg --print-architecture)
rpm_arch=$(rpm --eval '%{_arch}')
for f in "meshd_${version}-1_$arch.deb" "mesh-controller_${version}-1_$arch.deb" \
    "meshd-$version-1.$rpm_arch.rpm" "mesh-controller-$version-1.$rpm_arch.rpm"; do
    [ -f "$out/$f" ] || die "expected $out/$f, but it was not made"
    echo "$out/$f"
done
