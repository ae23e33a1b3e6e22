/** Ferry's public library surface: what package sets import from "ferry". */
export { FerryError, isFerryError } from "./core/errors.js";
export * from "./dsl/index.js";
