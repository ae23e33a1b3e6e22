/**
 * Errors a user can reach carry a stable `code` and a `hint` that says what to do about it.
 * Bugs stay plain `Error`. The CLI's single top-level handler prints FerryErrors without a
 * stack trace; anything else is printed as an internal error with its stack.
 *
 * Codes are `FERRY_<AREA>_<WHAT>` and never change once published: scripts and tests match on them.
 */
export class FerryError extends Error {
  readonly code: string;
  readonly hint: string | undefined;
  /** Extra facts a caller may show or log (byte offset, path, expected value, …). */
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: string, message: string, opts: { hint?: string; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "FerryError";
    this.code = code;
    this.hint = opts.hint;
    this.details = Object.freeze({ ...(opts.details ?? {}) });
  }
}

export function isFerryError(e: unknown, code?: string): e is FerryError {
  return e instanceof FerryError && (code === undefined || e.code === code);
}

/** A FerryError as plain data: how one crosses a thread, a process or an HTTP response. */
export interface ErrorBody {
  readonly code: string;
  readonly message: string;
  readonly hint?: string;
}

export function errorBody(e: FerryError): ErrorBody {
  return { code: e.code, message: e.message, ...(e.hint ? { hint: e.hint } : {}) };
}

/** The FerryError an ErrorBody describes (its stack is the receiver's). */
export function fromErrorBody(b: ErrorBody): FerryError {
  return new FerryError(b.code, b.message, b.hint ? { hint: b.hint } : {});
}

/** Any thrown value as a FerryError: coded errors pass through, others (system errors) become FERRY_IO. */
export function asFerryError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const err = e as { message?: string } | undefined;
  return new FerryError("FERRY_IO", err?.message ?? String(e), { hint: "see the message for the file and the system error", cause: e });
}
