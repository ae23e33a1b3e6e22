/**
 * Aggregate jobs, like Hydra's `tested`: one job that stands for several others, so that a
 * channel or a release can follow "everything in this list built".
 *
 *   export const tested = aggregate({ name: "tested", constituents: [app, tools, image] });
 *
 * The result is a small derivation whose inputs are the constituents (it writes their output
 * paths, one a line, to $out), so it can only build once they all have. On the farm, the
 * constituents that are jobs of the same evaluation become the aggregate build's members, and
 * the aggregate build's status follows theirs: it fails as soon as one of them fails.
 */
import { evalContext } from "./context.js";
import { derivation, evalError } from "./derivation.js";
import { Package } from "./values.js";

export interface AggregateArgs {
  readonly name: string;
  /** The packages it stands for: a list, or a set of named packages. */
  readonly constituents: readonly Package[] | Readonly<Record<string, Package>>;
  /** Where the aggregate itself is built (default: this machine's system). */
  readonly system?: string;
}

/** What an aggregate's `meta` holds: the derivations of its constituents. */
export interface AggregateMeta {
  readonly constituents: readonly string[];
}

export function aggregate(a: AggregateArgs): Package {
  const list = Array.isArray(a.constituents) ? (a.constituents as readonly Package[]) : Object.values(a.constituents as Record<string, Package>);
  if (list.length === 0) throw evalError("FERRY_EVAL_BAD_VALUE", `aggregate '${a.name}' has no constituents`, "list the packages it stands for in 'constituents'");
  list.forEach((p, i) => {
    if (!(p instanceof Package)) throw evalError("FERRY_EVAL_BAD_VALUE", `constituent ${i} of aggregate '${a.name}' is not a package`, "constituents are packages (derivation, mkPackage, …)");
  });
  const meta: AggregateMeta = { constituents: [...new Set(list.map((p) => p.drvPath))] };
  return derivation(
    {
      name: a.name,
      system: a.system ?? evalContext().settings.hostSystem,
      builder: "/bin/sh",
      args: ["-c", 'for p in $constituents; do printf "%s\\n" "$p"; done > "$out"'],
      constituents: [...list],
      ferryHostTools: "sh",
    },
    { aggregate: meta },
  );
}

/** The constituents' derivations, when `meta` is an aggregate's. */
export function aggregateConstituents(meta: Readonly<Record<string, unknown>>): readonly string[] | undefined {
  const a = meta.aggregate as { constituents?: unknown } | undefined;
  return a && Array.isArray(a.constituents) && a.constituents.every((c) => typeof c === "string") ? (a.constituents as string[]) : undefined;
}
