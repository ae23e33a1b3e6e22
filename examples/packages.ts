/**
 * Real C projects built with Ferry's generic builder: GNU hello, zlib, bzip2, XZ Utils, Lua and
 * libpng (which links zlib), plus zlib and hello cross-compiled for aarch64. See README.md here.
 *
 *   ferry build examples/packages.ts#hello --root /tmp/ferry
 */
import { fetchurl, mkPackage, packageSet, type Package } from "ferry";

/** Where a package runs: natively (the default) or cross-compiled for another system. */
interface Target {
  readonly crossSystem?: string;
}

function hello({ crossSystem }: Target = {}): Package {
  return mkPackage({
    pname: "hello",
    version: "2.10",
    src: fetchurl({
      urls: ["https://ftpmirror.gnu.org/hello/hello-2.10.tar.gz", "https://ftp.gnu.org/gnu/hello/hello-2.10.tar.gz"],
      hash: "sha256-MeBmE3qWJnbon2nRtlOC3pWn732RS4y5VvQepy4PUWs=",
    }),
    crossSystem,
  });
}

function zlib({ crossSystem }: Target = {}): Package {
  return mkPackage({
    pname: "zlib",
    version: "1.2.13",
    // Debian's repack of zlib 1.2.13 (the same sources without the contrib/ binaries).
    src: fetchurl({
      urls: [
        "https://ftp.halifax.rwth-aachen.de/debian/pool/main/z/zlib/zlib_1.2.13.dfsg.orig.tar.bz2",
        "https://mirrors.kernel.org/debian/pool/main/z/zlib/zlib_1.2.13.dfsg.orig.tar.bz2",
      ],
      hash: "sha256-cf63lH48AO8SX4O3mk5Sm94xFx5bq+SLOR8GdY0asKE=",
    }),
    crossSystem,
    // zlib's configure is its own, not autoconf's: it takes no --host and finds the cross compiler through $CC.
    configurePlatforms: [],
  });
}

function bzip2(): Package {
  return mkPackage({
    pname: "bzip2",
    version: "1.0.8",
    src: fetchurl({
      url: "https://sourceware.org/pub/bzip2/bzip2-1.0.8.tar.gz",
      hash: "sha256-q1oDF27hBtPw+pDjgdpHjdrkBZGBU8yiSOaCzQxKImk=",
    }),
    // A plain Makefile: `make` builds and self-tests libbz2.a and the programs.
    installPhase: 'make install PREFIX="$out"',
  });
}

function xz(): Package {
  return mkPackage({
    pname: "xz",
    version: "5.4.1",
    src: fetchurl({
      urls: ["https://tukaani.org/xz/xz-5.4.1.tar.xz", "https://downloads.sourceforge.net/project/lzmautils/xz-5.4.1.tar.xz"],
      hash: "sha256-XZgnqhh1shwoj3iGS7JtJlC0NuqNLK02Tkkh62JmpaU=",
    }),
    configureFlags: ["--disable-static", "--disable-doc"],
  });
}

function lua(): Package {
  return mkPackage({
    pname: "lua",
    version: "5.4.4",
    src: fetchurl({
      url: "https://www.lua.org/ftp/lua-5.4.4.tar.gz",
      hash: "sha256-Fkx4SWU7gK5nvsS3RzuIS/XMjS3KBWU0dewu0nuev2E=",
    }),
    // No configure: the Makefile takes the platform as its target.
    buildPhase: 'make -j"$NIX_BUILD_CORES" linux',
    installPhase: 'make install INSTALL_TOP="$out"',
  });
}

function libpng({ zlib, crossSystem }: Target & { readonly zlib: Package }): Package {
  return mkPackage({
    pname: "libpng",
    version: "1.6.39",
    src: fetchurl({
      urls: [
        "https://downloads.sourceforge.net/project/libpng/libpng16/1.6.39/libpng-1.6.39.tar.gz",
        "https://download.sourceforge.net/libpng/libpng-1.6.39.tar.gz",
      ],
      hash: "sha256-oA6dLy9mQYbkIC25KZOX+FGupxs2o150kQuIIOOA1EE=",
    }),
    buildInputs: [zlib],
    crossSystem,
  });
}

/** The members of the set (a type alias, so that it is a record of packages). */
export type ExamplePackages = {
  readonly hello: Package;
  readonly zlib: Package;
  readonly bzip2: Package;
  readonly xz: Package;
  readonly lua: Package;
  readonly libpng: Package;
  readonly "hello-aarch64": Package;
  readonly "zlib-aarch64": Package;
  readonly "libpng-aarch64": Package;
};

const aarch64: Target = { crossSystem: "aarch64-linux" };

export default packageSet<ExamplePackages>((self) => ({
  hello: () => hello(),
  zlib: () => zlib(),
  bzip2: () => bzip2(),
  xz: () => xz(),
  lua: () => lua(),
  libpng: () => libpng({ zlib: self.zlib }),
  "hello-aarch64": () => hello(aarch64),
  "zlib-aarch64": () => zlib(aarch64),
  "libpng-aarch64": () => libpng({ ...aarch64, zlib: self["zlib-aarch64"] }),
}));
