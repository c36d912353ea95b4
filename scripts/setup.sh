#!/usr/bin/env bash
# Installs what building and testing expertd needs on Debian (12 or later), then fetches and
# verifies the pinned llama.cpp source. Idempotent: installed pieces are left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root or install sudo: installing Debian packages needs root"
  sudo="sudo"
fi

# Debian packages: compilers and build tools for llama.cpp, git for patches, Python's pip
# for the pinned sdist, libclang for bindgen, fio for the benchmarks.
packages=(build-essential cmake ninja-build ccache git python3 python3-pip pkg-config
          libclang-dev clang curl ca-certificates fio)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: the workspace needs a current stable toolchain (edition 2024).
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    say "installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
      || die "could not install Rust; install it from https://rustup.rs and run again"
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
[ "$rustc_minor" -ge 85 ] || die "Rust $(rustc --version) is too old; 1.85 or later is needed (rustup update)"

# Python packages upstream's gguf-py needs; a test reads our synthetic models with it.
if ! python3 -c 'import numpy, yaml' 2>/dev/null; then
  say "installing numpy and PyYAML for python3"
  python3 -m pip install --quiet 'numpy>=2.2.6' pyyaml 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages 'numpy>=2.2.6' pyyaml \
    || die "could not install numpy and PyYAML with pip"
fi

bash vendor/fetch.sh
say "done"
