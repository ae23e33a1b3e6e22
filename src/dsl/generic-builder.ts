/**
 * The generic builder behind `mkPackage`: a POSIX shell script that runs the usual phases
 * (unpack, patch, configure, build, check, install, fixup). It becomes a text object in the
 * store and is the builder's argument, so changing it changes every package's identity.
 *
 * Contract with `mkPackage` (all through the environment):
 * - `phases`: the phase names to run, in order; each phase `xPhase` runs `$xPhase` if that
 *   variable is set (the package overrode it), else the default below; the hooks `preX` and
 *   `postX` (e.g. `preConfigure`, `postInstall`) run around it.
 * - `src`: a directory, or a tar archive (plain, gzip, bzip2 or xz, recognised by its contents,
 *   so the file may be called anything). The source root is `$sourceRoot` if set, else the one
 *   directory the archive holds, else the build directory itself.
 * - `buildInputs`: store paths whose bin/, include/ and lib/ are put on PATH, the C include
 *   path, the library path and the runtime search path (rpath).
 * - `ferryHostPath`: host directories for declared host tools, appended to PATH.
 * - `configureFlags`, `makeFlags`, `installFlags`, `doCheck`, `dontConfigure`, `dontStrip`.
 * - Cross builds set `ferryCrossHost` and `ferryCrossBuild` (GNU triplets): CC/CXX/AR/RANLIB/
 *   STRIP/LD get the host's prefix, CC_FOR_BUILD is the native compiler, and configure gets
 *   `--build`/`--host` as `configurePlatforms` says (default both; empty for configure
 *   scripts that are not autoconf's and find the cross compiler through $CC).
 * - Reproducibility: a fixed locale, time zone, umask and SOURCE_DATE_EPOCH; build paths in
 *   debug info and __FILE__ are mapped to /build; installed ELF files are stripped of debug
 *   information (unless `dontStrip`); libtool's .la files are removed.
 */
export const GENERIC_BUILDER = `#!/bin/sh
# Ferry generic builder. Runs the phases named in $phases; see mkPackage.
set -eu
umask 022
export LC_ALL=C TZ=UTC
export SOURCE_DATE_EPOCH="\${SOURCE_DATE_EPOCH:-1}"
export ZERO_AR_DATE=1
PATH=/path-not-set
for p in \${buildInputs:-}; do
  [ -d "$p/bin" ] && PATH="$p/bin:$PATH"
done
PATH="$PATH:\${ferryHostPath:-}"
export PATH
CPATH=""; LIBRARY_PATH=""; LDFLAGS="\${LDFLAGS:-}"; PKG_CONFIG_PATH=""
for p in \${buildInputs:-}; do
  [ -d "$p/include" ] && CPATH="$p/include\${CPATH:+:$CPATH}"
  if [ -d "$p/lib" ]; then
    LIBRARY_PATH="$p/lib\${LIBRARY_PATH:+:$LIBRARY_PATH}"
    LDFLAGS="$LDFLAGS -L$p/lib -Wl,-rpath,$p/lib"
    [ -d "$p/lib/pkgconfig" ] && PKG_CONFIG_PATH="$p/lib/pkgconfig\${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  fi
done
export CPATH LIBRARY_PATH LDFLAGS PKG_CONFIG_PATH
export CFLAGS="\${CFLAGS:--O2} -ffile-prefix-map=$NIX_BUILD_TOP=/build"
export CXXFLAGS="\${CXXFLAGS:--O2} -ffile-prefix-map=$NIX_BUILD_TOP=/build"
if [ -n "\${ferryCrossHost:-}" ]; then
  export CC="$ferryCrossHost-gcc" CXX="$ferryCrossHost-g++" AR="$ferryCrossHost-ar" RANLIB="$ferryCrossHost-ranlib" STRIP="$ferryCrossHost-strip" LD="$ferryCrossHost-ld"
  export CC_FOR_BUILD="\${CC_FOR_BUILD:-gcc}"
  # Cross toolchains search their own sysroot; our inputs come through the variables above.
  export C_INCLUDE_PATH="$CPATH"
  platformFlags=""
  for p in \${configurePlatforms-build host}; do
    case "$p" in
      build) platformFlags="$platformFlags --build=\${ferryCrossBuild:?ferryCrossBuild is not set}" ;;
      host) platformFlags="$platformFlags --host=$ferryCrossHost" ;;
      *) echo "ferry: unknown platform '$p' in configurePlatforms" >&2; exit 1 ;;
    esac
  done
else
  export CC="\${CC:-gcc}" CXX="\${CXX:-g++}" STRIP="\${STRIP:-strip}"
  platformFlags=""
fi
jobs="\${NIX_BUILD_CORES:-1}"
[ "$jobs" -gt 0 ] 2>/dev/null || jobs=1

runHook() { eval "h=\\\${$1:-}"; if [ -n "$h" ]; then eval "$h"; fi; }

defaultUnpack() {
  if [ -d "$src" ]; then
    cp -R "$src" ./source; chmod -R u+w ./source
    : "\${sourceRoot:=source}"
  else
    # GNU tar recognises gzip, bzip2 and xz by content, whatever the file is called.
    tar -xf "$src"
    if [ -z "\${sourceRoot:-}" ]; then
      sourceRoot=.
      set -- *
      if [ $# -eq 1 ] && [ -d "$1" ]; then sourceRoot=$1; fi
    fi
  fi
  cd "$sourceRoot"
}
defaultPatch() { for p in \${patches:-}; do patch -p1 < "$p"; done; }
defaultConfigure() {
  [ -n "\${dontConfigure:-}" ] && return 0
  if [ -x ./configure ]; then
    # shellcheck disable=SC2086
    ./configure --prefix="$out" $platformFlags \${configureFlags:-}
  fi
}
defaultBuild() {
  # shellcheck disable=SC2086
  if [ -f Makefile ] || [ -f makefile ] || [ -f GNUmakefile ]; then make -j"$jobs" \${makeFlags:-}; fi
}
defaultCheck() {
  [ -n "\${doCheck:-}" ] || return 0
  # shellcheck disable=SC2086
  make -j"$jobs" \${checkTarget:-check} \${makeFlags:-}
}
defaultInstall() {
  # shellcheck disable=SC2086
  make install \${makeFlags:-} \${installFlags:-}
}
defaultFixup() {
  [ -d "$out" ] || return 0
  find "$out" -name '*.la' -delete 2>/dev/null || true
  if [ -z "\${dontStrip:-}" ]; then
    find "$out" -type f \\( -perm -0100 -o -name '*.so*' -o -name '*.a' \\) 2>/dev/null | while read -r f; do
      case "$(head -c 4 "$f" | od -An -c | tr -d ' ')" in
        *ELF*|*'!<ar'*) "$STRIP" -S -p "$f" 2>/dev/null || true ;;
      esac
    done
  fi
}

for phase in \${phases:-unpackPhase patchPhase configurePhase buildPhase checkPhase installPhase fixupPhase}; do
  echo "ferry: running $phase"
  base="\${phase%Phase}"
  cap="$(printf %s "$base" | cut -c1 | tr a-z A-Z)$(printf %s "$base" | cut -c2-)"
  runHook "pre$cap"
  eval "custom=\\\${$phase:-}"
  if [ -n "$custom" ]; then
    eval "$custom"
  else
    case "$phase" in
      unpackPhase) defaultUnpack ;;
      patchPhase) defaultPatch ;;
      configurePhase) defaultConfigure ;;
      buildPhase) defaultBuild ;;
      checkPhase) defaultCheck ;;
      installPhase) defaultInstall ;;
      fixupPhase) defaultFixup ;;
      *) echo "ferry: unknown phase $phase" >&2; exit 1 ;;
    esac
  fi
  runHook "post$cap"
done
`;
