/** `mkPackage`: a package built with the usual phases by Ferry's generic builder. */
import { makeTextPath, printStorePath } from "../core/store-path.js";
import { makeHash } from "../core/hash.js";
import { sha256 } from "../core/digest.js";
import { evalContext } from "./context.js";
import { derivation, evalError, type AttrValue } from "./derivation.js";
import { GENERIC_BUILDER } from "./generic-builder.js";
import { builderPath, type StoreThing } from "./builders.js";
import type { Package } from "./values.js";

/**
 * What C packages need from the host when they use its compiler (autoconf's configure, make,
 * libtool and the generic builder's own phases); override with `hostTools`.
 */
export const DEFAULT_HOST_TOOLS: readonly string[] = [
  "sh", "gcc", "g++", "cc", "cpp", "ld", "ar", "as", "ranlib", "nm", "strip", "make", "tar", "gzip", "bzip2", "xz",
  "sed", "grep", "awk", "find", "cmp", "diff", "patch", "cat", "cp", "mv", "rm", "mkdir", "rmdir", "chmod", "ln", "ls", "touch",
  "install", "sort", "uniq", "tr", "od", "head", "tail", "cut", "expr", "wc", "uname", "basename", "dirname", "env", "sleep", "date",
];

/** GNU triplets of the systems Ferry cross-compiles to with the host's cross toolchains. */
export const CROSS_TRIPLETS: Readonly<Record<string, string>> = {
  "aarch64-linux": "aarch64-linux-gnu",
  "x86_64-linux": "x86_64-linux-gnu",
};

type Phase = "unpackPhase" | "patchPhase" | "configurePhase" | "buildPhase" | "checkPhase" | "installPhase" | "fixupPhase";
type Hook = "preUnpack" | "postUnpack" | "prePatch" | "postPatch" | "preConfigure" | "postConfigure" | "preBuild" | "postBuild" | "preCheck" | "postCheck" | "preInstall" | "postInstall" | "preFixup" | "postFixup";

export interface PackageArgs extends Partial<Record<Phase | Hook, string>> {
  readonly pname: string;
  readonly version: string;
  readonly src: StoreThing;
  /** Libraries and tools this package builds against (their bin, include and lib are used). */
  readonly buildInputs?: readonly StoreThing[];
  /** Host programs the build uses; the build fails clearly if the host lacks one. */
  readonly hostTools?: readonly string[];
  readonly configureFlags?: readonly string[];
  readonly makeFlags?: readonly string[];
  readonly installFlags?: readonly string[];
  readonly patches?: readonly StoreThing[];
  readonly doCheck?: boolean;
  readonly dontConfigure?: boolean;
  readonly dontStrip?: boolean;
  /** Phases to run, in order (default: all seven). */
  readonly phases?: readonly string[];
  readonly outputs?: readonly string[];
  /** Where it is built (default: this machine's system). */
  readonly system?: string;
  /** Cross-compile for this system with the host's cross toolchain (e.g. aarch64-linux). */
  readonly crossSystem?: string;
  /**
   * In a cross build, which of configure's `--build`/`--host` flags to pass (default both).
   * `[]` for configure scripts that are not autoconf's (zlib's), which take the compiler from $CC.
   */
  readonly configurePlatforms?: readonly ("build" | "host")[];
  /** The directory to build in, relative to where the source was unpacked (default: the one directory the archive holds). */
  readonly sourceRoot?: string;
  /** More environment variables for the build. */
  readonly env?: Readonly<Record<string, AttrValue>>;
  readonly meta?: Readonly<Record<string, unknown>>;
}

function genericBuilderPath(): string {
  const ctx = evalContext();
  const storePath = printStorePath(makeTextPath(ctx.storeDir, "ferry-generic-builder.sh", makeHash("sha256", sha256(GENERIC_BUILDER))));
  ctx.addPlannedText({ storePath, name: "ferry-generic-builder.sh", text: GENERIC_BUILDER, references: [] }, true);
  return storePath;
}

export function mkPackage(a: PackageArgs): Package {
  const ctx = evalContext();
  if (!a.pname || !a.version) throw evalError("FERRY_EVAL_BAD_VALUE", "mkPackage needs a pname and a version");
  if (a.src === undefined) throw evalError("FERRY_EVAL_BAD_VALUE", `package ${a.pname} has no src`, "use fetchurl({ url, hash }) or source(\"./dir\")");
  const system = a.system ?? ctx.settings.hostSystem;
  let triplet: string | undefined;
  if (a.crossSystem && a.crossSystem !== system) {
    triplet = CROSS_TRIPLETS[a.crossSystem];
    if (!triplet) throw evalError("FERRY_EVAL_NO_CROSS", `no cross toolchain is known for ${a.crossSystem}`, `known: ${Object.keys(CROSS_TRIPLETS).join(", ")}`);
  }
  const buildTriplet = triplet ? CROSS_TRIPLETS[system] : undefined;
  if (triplet && !buildTriplet) throw evalError("FERRY_EVAL_NO_CROSS", `cannot cross-compile from ${system}: its GNU triplet is not known`, `known: ${Object.keys(CROSS_TRIPLETS).join(", ")}`);
  const crossTools = triplet ? ["gcc", "ar", "ranlib", "strip"].map((t) => `${triplet}-${t}`) : [];
  const hostTools = [...(a.hostTools ?? DEFAULT_HOST_TOOLS), ...crossTools];
  const buildInputs = a.buildInputs ?? [];
  const attrs: Record<string, AttrValue> = {
    ...(a.env ?? {}),
    name: `${a.pname}-${a.version}`,
    pname: a.pname,
    version: a.version,
    system,
    builder: "/bin/sh",
    args: [genericBuilderPath()],
    src: a.src,
    buildInputs: [...buildInputs],
    ferryHostTools: hostTools.join(" "),
    ferryHostPath: builderPath([], hostTools) || undefined,
  };
  if (a.outputs) attrs.outputs = [...a.outputs];
  if (triplet) {
    attrs.ferryCrossHost = triplet;
    attrs.ferryCrossBuild = buildTriplet;
    if (a.configurePlatforms) attrs.configurePlatforms = [...a.configurePlatforms];
  }
  if (a.sourceRoot) attrs.sourceRoot = a.sourceRoot;
  if (a.configureFlags) attrs.configureFlags = [...a.configureFlags];
  if (a.makeFlags) attrs.makeFlags = [...a.makeFlags];
  if (a.installFlags) attrs.installFlags = [...a.installFlags];
  if (a.patches) attrs.patches = [...a.patches];
  if (a.doCheck) attrs.doCheck = true;
  if (a.dontConfigure) attrs.dontConfigure = true;
  if (a.dontStrip) attrs.dontStrip = true;
  if (a.phases) attrs.phases = [...a.phases];
  for (const k of Object.keys(a) as (keyof PackageArgs)[]) {
    if (/^(pre|post)[A-Z]|Phase$/.test(k)) attrs[k] = a[k] as string;
  }
  const { args, ...rest } = attrs;
  return derivation({ ...(rest as Record<string, AttrValue>), name: attrs.name as string, system: attrs.system as string, builder: "/bin/sh", args: args as string[] }, {
    pname: a.pname,
    version: a.version,
    hostTools,
    ...(a.crossSystem ? { targetSystem: a.crossSystem } : {}),
    ...(a.meta ?? {}),
  });
}
