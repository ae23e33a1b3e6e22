/** What package sets import from "ferry". */
export { derivation, type DerivationAttrs, type AttrValue } from "./derivation.js";
export { mkPackage, DEFAULT_HOST_TOOLS, type PackageArgs } from "./package.js";
export { fetchurl, writeText, writeScript, runCommand, symlinkJoin, BASIC_HOST_TOOLS, type FetchurlArgs } from "./builders.js";
export { source } from "./sources.js";
export { packageSet } from "./package-set.js";
export { aggregate, type AggregateArgs } from "./aggregate.js";
export { Package, OutputRef, SourcePath } from "./values.js";
export { evalContext } from "./context.js";
import { evalContext } from "./context.js";

/** The system this evaluation builds for natively (e.g. x86_64-linux). */
export function hostSystem(): string {
  return evalContext().settings.hostSystem;
}
