#!/usr/bin/env bash
# Render a report.html (probssl report / probssl bench) to PNGs with headless Chromium, to look at the
# page as a reader does: scripts/screenshot_report.sh REPORT.html OUT_DIR [WIDTH=1400] [TILE=4000]
# Writes OUT_DIR/page-00.png, page-01.png, ... (WIDTH x TILE px each, the whole page top to bottom) and
# OUT_DIR/console.log (Chromium's stderr; errors of the page itself are its "CONSOLE" lines).
# Needs chromium on PATH (Debian: apt-get install chromium); exits 2 with a message when it is absent.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 REPORT.html OUT_DIR [WIDTH] [TILE]" >&2; exit 64; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "$0: no chromium on PATH (Debian: apt-get install chromium)" >&2; exit 2; }
report=$(realpath "$1") out=$2 width=${3:-1400} tile=${4:-4000}
mkdir -p "$out" && : >"$out/console.log"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
shoot() {  # shoot HEIGHT FLAGS... : one headless page load in a throwaway profile
  timeout 300 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$tmp/profile" \
    --enable-logging=stderr --v=0 --window-size="$width,$1" "${@:2}" 2>>"$out/console.log"
}
# The report has no scripts; a copy with one reports the page height through its title.
sed 's#</body>#<script>document.title="H="+document.documentElement.scrollHeight</script></body>#' \
  "$report" >"$tmp/measure.html"
height=$(shoot 900 --dump-dom "file://$tmp/measure.html" | grep -m1 -o 'H=[0-9]*' | cut -d= -f2)
[ -n "$height" ] || { echo "$0: chromium rendered nothing (see $out/console.log)" >&2; exit 1; }
i=0
for ((y = 0; y < height; y += tile, i++)); do  # one window per tile: the copy is shifted up by y px
  sed "s#</head>#<style>body{transform:translateY(-${y}px)}</style></head>#" "$report" >"$tmp/tile.html"
  shoot $((height - y < tile ? height - y : tile)) --screenshot="$out/$(printf 'page-%02d.png' "$i")" \
    "file://$tmp/tile.html" >/dev/null
done
echo "$out: $i PNG(s) of a ${width}x${height} px page; console: $(grep -c CONSOLE "$out/console.log" || true) message(s)"
