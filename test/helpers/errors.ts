/** Assertions about coded errors. */
import assert from "node:assert/strict";
import { FerryError } from "../../src/core/errors.js";

/** Runs `fn`, asserts it throws a FerryError with `code` (and a message matching `message`), returns it. */
export function throwsFerry(fn: () => unknown, code: string, message?: RegExp): FerryError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught !== undefined, `expected a FerryError ${code}, but nothing was thrown`);
  assert.ok(caught instanceof FerryError, `expected a FerryError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, `wrong code; message: ${caught.message}`);
  if (message) assert.match(caught.message, message);
  return caught;
}
