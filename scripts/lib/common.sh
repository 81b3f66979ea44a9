# Shell helpers shared by scripts/test and scripts/demo. Source it; it defines functions only.
# shellcheck shell=bash

# The Debian packages a developer machine or CI needs to build, test and demo sluice.
SLUICE_PACKAGES=(
    meson ninja-build g++ pkg-config
    libuv1-dev libssl-dev doctest-dev libtomlplusplus-dev libcurl4-openssl-dev
    openssl curl gnutls-bin python3 clang-format cmake strace
    haproxy
)

# say MESSAGE: a progress line on stderr, so stdout keeps only results.
say() { printf '==> %s\n' "$*" >&2; }

# die MESSAGE: report and exit non-zero.
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# missing_packages PKG...: prints the packages that dpkg does not report as installed.
missing_packages() {
    local pkg status
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ $status == "install ok installed" ]] || printf '%s\n' "$pkg"
    done
}

# ensure_packages PKG...: installs what is missing with apt-get, and does nothing (no network,
# no root needed) when everything is already there.
ensure_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]} == 0)) && return 0
    say "installing missing packages: ${missing[*]}"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q >&2
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# meson_build DIR BUILDTYPE [MESON OPTIONS...]: configures DIR once, then builds it with at most
# two jobs (the machines this runs on have two cores).
meson_build() {
    local dir=$1 buildtype=$2
    shift 2
    if [[ ! -f $dir/build.ninja ]]; then
        meson setup "$dir" --buildtype="$buildtype" "$@" >&2
    elif (($#)); then
        meson configure "$dir" "$@" >&2
    fi
    ninja -C "$dir" -j2 >&2
}

# now_s: seconds since the epoch with a fraction, for phase timings.
now_s() { date +%s.%N; }

# elapsed START: seconds since START, one decimal.
elapsed() { awk -v s="$1" -v e="$(now_s)" 'BEGIN { printf "%.1f", e - s }'; }
