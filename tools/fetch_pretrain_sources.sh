#!/usr/bin/env bash
# Download and unpack the unlabeled image sources of `python -m pipeline pretrain` (pipeline/pretrain/pool.py).
#
# Usage: bash tools/fetch_pretrain_sources.sh DEST_DIR
#
#   DEST_DIR/openclipart/  Debian openclipart-png (public domain clip art; dpkg-deb -x, nothing installed)
#   DEST_DIR/emoji/        the four emoji packages of build-emoji (tools/fetch_emoji_packages.sh); the pool uses
#                          noto, openmoji and emojione drawings outside the embedded set, and Twemoji's emoji.json
#                          for category names only
# A source already unpacked (its .done marker exists) is not fetched again. Needs `apt-get update` run once.
set -euo pipefail

OPENCLIPART_DEB_VERSION="1:0.18+dfsg-19"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest="$1"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ ! -f "$dest/openclipart/.done" ]]; then
    mkdir -p "$dest/downloads"
    echo "==> apt-get download openclipart-png=$OPENCLIPART_DEB_VERSION"
    (cd "$dest/downloads" && apt-get download "openclipart-png=$OPENCLIPART_DEB_VERSION")
    rm -rf "${dest:?}/openclipart"
    mkdir -p "$dest/openclipart"
    dpkg-deb -x "$dest/downloads/openclipart-png_${OPENCLIPART_DEB_VERSION//:/%3a}_all.deb" "$dest/openclipart"
    touch "$dest/openclipart/.done"
fi

if [[ ! -f "$dest/emoji/.done" ]]; then
    bash "$here/fetch_emoji_packages.sh" "$dest/emoji"
    touch "$dest/emoji/.done"
fi
echo "==> pretrain sources in $dest: openclipart/ emoji/"
