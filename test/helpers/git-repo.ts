/** Real git repositories in temporary directories, for the farm's jobsets and declarations. */
import * as fs from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";

/** Writes `files` into the repository at `dir` and commits them. */
export function gitCommit(dir: string, files: Readonly<Record<string, string>>, message = "change"): void {
  const g = (...args: string[]) => execFileSync("git", ["-c", "user.name=t", "-c", "user.email=t@example.org", "-C", dir, ...args], { stdio: "pipe" });
  for (const [name, text] of Object.entries(files)) fs.writeFileSync(join(dir, name), text);
  g("add", ".");
  g("commit", "--quiet", "-m", message);
}

/** A repository at `dir` (branch main) with `files` in its first commit; returns its path. */
export function gitRepo(dir: string, files: Readonly<Record<string, string>>): string {
  fs.mkdirSync(dir, { recursive: true });
  execFileSync("git", ["-C", dir, "init", "--quiet", "--initial-branch=main"], { stdio: "pipe" });
  gitCommit(dir, files, "one");
  return dir;
}
