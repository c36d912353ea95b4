#!/usr/bin/env bash
# Fetch the pinned llama.cpp source and verify it.
#
#   vendor/fetch.sh [DEST]        (DEST defaults to vendor/llama.cpp, git-ignored)
#
# Downloads the PyPI sdist named in vendor/llama.cpp.pin with pip (cached under
# $EXPERTD_CACHE, default ~/.cache/expertd), checks its sha256, and extracts only the
# sdist's vendor/llama.cpp into DEST. Idempotent: a DEST that already holds the tree
# verified from this pin is left alone. EXPERTD_SDIST=FILE uses that file instead of
# downloading (it is verified all the same).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pin="$here/llama.cpp.pin"
dest=${1:-"$here/llama.cpp"}

die() { echo "vendor/fetch.sh: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; $2"; }

[ -r "$pin" ] || die "pin file $pin is missing"
pinval() { sed -n "s/^$1=//p" "$pin"; }
package=$(pinval package); version=$(pinval version); sha=$(pinval sha256); commit=$(pinval upstream_commit)
[ -n "$package" ] && [ -n "$version" ] && [ -n "$sha" ] || die "pin file $pin lacks package, version or sha256"

stamp="$dest/.expertd-pin"
want="$package==$version sha256=$sha commit=$commit"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dest/CMakeLists.txt" ]; then
  echo "vendor/fetch.sh: $dest already holds $package==$version (verified); nothing to do"
  exit 0
fi

need sha256sum "install coreutils"
need tar "install tar (apt-get install tar)"

sdist=${EXPERTD_SDIST:-}
if [ -z "$sdist" ]; then
  cache=${EXPERTD_CACHE:-"$HOME/.cache/expertd"}
  mkdir -p "$cache"
  # pip normalises the file name to an underscore form.
  sdist="$cache/${package//-/_}-$version.tar.gz"
  if [ ! -f "$sdist" ] || ! echo "$sha  $sdist" | sha256sum --check --status; then
    rm -f "$sdist"
    need python3 "install Python 3 (apt-get install python3 python3-pip)"
    python3 -m pip --version >/dev/null 2>&1 || die "pip is not installed; apt-get install python3-pip"
    # pip prepares the sdist's metadata, which needs cmake: without Debian's cmake it
    # builds cmake from source (slow).
    command -v cmake >/dev/null 2>&1 || echo "vendor/fetch.sh: warning: cmake not found; pip may build it from source (apt-get install cmake)" >&2
    echo "vendor/fetch.sh: downloading $package==$version with pip into $cache"
    python3 -m pip download --quiet --no-deps --no-binary :all: "$package==$version" -d "$cache" \
      || die "pip could not download $package==$version (is PyPI reachable?)"
    [ -f "$sdist" ] || die "pip did not leave the expected file $sdist"
  fi
fi

[ -f "$sdist" ] || die "sdist $sdist does not exist"
got=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  die "checksum mismatch for $sdist: expected sha256 $sha, got $got. The download is corrupt or not the pinned release; delete it and run again."
fi
echo "vendor/fetch.sh: sha256 verified for $(basename "$sdist")"

tmp=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
top="${package//-/_}-$version"
tar -xzf "$sdist" -C "$tmp" "$top/vendor/llama.cpp" \
  || die "could not extract $top/vendor/llama.cpp from $sdist"
[ -f "$tmp/$top/vendor/llama.cpp/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp/CMakeLists.txt"
# The sdist keeps llama.cpp's submodule pointer (a .git file naming a gitdir that does not
# exist here); without it, git tools treat the tree as plain files.
rm -f "$tmp/$top/vendor/llama.cpp/.git"
echo "$want" > "$tmp/$top/vendor/llama.cpp/.expertd-pin"
rm -rf "$dest"
mv "$tmp/$top/vendor/llama.cpp" "$dest"
echo "vendor/fetch.sh: extracted llama.cpp $commit into $dest"
