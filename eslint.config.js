// Lint rules: typescript-eslint's recommended set, plus the house rule that core/ and the farm's
// scheduler do no I/O (and the scheduler reads no clock: time is passed in).
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["dist/**", "node_modules/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
    },
  },
  {
    files: ["src/core/**/*.ts"],
    rules: {
      "no-restricted-imports": ["error", {
        paths: ["node:fs", "node:fs/promises", "node:child_process", "node:net", "node:http", "node:os", "fs", "child_process"],
        patterns: ["../store/*", "../cli/*", "../build/*", "../cache/*"],
      }],
    },
  },
  {
    files: ["src/farm/scheduler/**/*.ts"],
    rules: {
      "no-restricted-imports": ["error", {
        paths: ["node:fs", "node:fs/promises", "node:child_process", "node:net", "node:http", "node:os", "fs", "child_process", "kysely", "pg"],
        patterns: ["../../store/*", "../../cli/*", "../../build/*", "../../cache/*", "../db/*"],
      }],
      "no-restricted-properties": ["error", { object: "Date", property: "now", message: "the scheduler takes `now` as an argument" }],
      "no-restricted-globals": ["error", "setTimeout", "setInterval", "performance"],
    },
  },
  {
    files: ["scripts/**/*.mjs", "bench/**/*.mjs"],
    languageOptions: {
      globals: Object.fromEntries(
        ["process", "console", "URL", "Buffer", "setTimeout", "clearTimeout", "setInterval", "clearInterval", "performance", "TextEncoder", "TextDecoder", "fetch"].map((g) => [g, "readonly"]),
      ),
    },
  },
);
