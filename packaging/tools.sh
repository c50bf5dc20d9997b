#!/bin/sh
# Installs the packaging tool that does not come from Debian: cargo-deb,
# pinned, when it is missing. Called by `make packages`, `make test` and
# packaging/build.sh. (rpmbuild, lintian and dpkg-shlibdeps are Debian
# packages: scripts/deps.sh installs them.)
set -eu

CARGO_DEB_VERSION=3.8.0

if cargo deb --version >/dev/null 2>&1; then
    exit 0
fi
echo "packaging/tools.sh: installing cargo-deb $CARGO_DEB_VERSION from crates.io" >&2
cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" || {
    echo "packaging/tools.sh: installing cargo-deb failed; install it by hand: cargo install cargo-deb --locked --version $CARGO_DEB_VERSION" >&2
    exit 1
}
