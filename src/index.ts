/** Ferry's public library surface. Internal modules are not part of the API. */
export { FerryError, isFerryError } from "./core/errors.js";
