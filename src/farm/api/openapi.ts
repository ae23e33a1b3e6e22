/**
 * The coordinator's API as an OpenAPI 3.1 document, served at `GET /api/openapi.json`. It is a
 * value kept next to the routes; a test checks that every route the router knows is described
 * here and that everything described here is routed (the one operation marked
 * `x-ferry-provided-by: dispatcher`, the worker WebSocket, is an upgrade the dispatcher takes).
 */
import type { Access } from "./http.js";

type Schema = Record<string, unknown>;

const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
const arrayOf = (s: Schema): Schema => ({ type: "array", items: s });
const json = (schema: Schema, description = "OK") => ({ description, content: { "application/json": { schema } } });
const errors = {
  "400": { $ref: "#/components/responses/BadRequest" },
  "401": { $ref: "#/components/responses/Unauthorized" },
  "403": { $ref: "#/components/responses/Forbidden" },
  "404": { $ref: "#/components/responses/NotFound" },
};

const param = (name: string, description: string, schema: Schema = { type: "string" }) => ({ name, in: "path", required: true, description, schema });
const P = {
  project: param("project", "project name"),
  jobset: param("jobset", "jobset name"),
  job: param("job", "job (attribute path in the package set)"),
  output: param("output", "output name (out, dev, …)"),
  id: param("id", "numeric id", { type: "string", pattern: "^[1-9][0-9]*$" }),
};

/** Who may call an operation: the router's access levels, and `worker` (the worker socket). */
type DocAccess = Access | "worker";

const security: Record<DocAccess, unknown[]> = {
  public: [],
  worker: [{ bearer: [] }],
  read: [{}, { bearer: [] }],
  admin: [{ bearer: [] }],
  self: [{ hubSignature: [] }, { gitlabToken: [] }, { bearer: [] }],
};

interface Op {
  readonly summary: string;
  readonly access: DocAccess;
  readonly params?: readonly unknown[];
  readonly query?: readonly unknown[];
  readonly body?: Schema;
  readonly responses: Record<string, unknown>;
  readonly description?: string;
  readonly dispatcher?: boolean;
}

const op = (o: Op) => ({
  summary: o.summary,
  ...(o.description ? { description: o.description } : {}),
  "x-ferry-access": o.access,
  security: security[o.access],
  ...(o.dispatcher ? { "x-ferry-provided-by": "dispatcher" } : {}),
  parameters: [...(o.params ?? []), ...(o.query ?? [])],
  ...(o.body ? { requestBody: { required: true, content: { "application/json": { schema: o.body } } } } : {}),
  responses: { ...o.responses, ...errors },
});

const js = [P.project, P.jobset];
const buildSelection: Schema = {
  type: "object",
  description: "builds by id, or a jobset's jobs in its latest evaluation (all of them when 'jobs' is left out)",
  properties: {
    builds: arrayOf({ type: "string" }),
    project: { type: "string" },
    jobset: { type: "string" },
    jobs: arrayOf({ type: "string" }),
    bump: { type: "integer", description: "bump only: the priority (higher first; default 1)" },
  },
};

export const OPENAPI = {
  openapi: "3.1.0",
  info: {
    title: "Ferry farm coordinator",
    version: "1",
    description:
      "Projects, jobsets, evaluations and builds of a Ferry build farm. Errors are `{ \"error\": { code, message, hint } }` with a stable FERRY_FARM_… code. " +
      "Reads are open unless the farm has a read-only token; changes need the admin token.",
  },
  components: {
    securitySchemes: {
      bearer: { type: "http", scheme: "bearer", description: "a token: --admin-token, --worker-token, --read-token, or one made with POST /api/tokens" },
      hubSignature: { type: "apiKey", in: "header", name: "X-Hub-Signature-256", description: "sha256=HMAC-SHA256(body) with --webhook-secret (GitHub, Gitea)" },
      gitlabToken: { type: "apiKey", in: "header", name: "X-Gitlab-Token", description: "the --webhook-secret itself (GitLab)" },
    },
    responses: {
      BadRequest: json(ref("Error"), "the request is malformed"),
      Unauthorized: json(ref("Error"), "a token is needed"),
      Forbidden: json(ref("Error"), "the token does not allow this"),
      NotFound: json(ref("Error"), "no such thing"),
    },
    schemas: {
      Error: { type: "object", required: ["error"], properties: { error: ref("ErrorDetail") } },
      ErrorDetail: { type: "object", required: ["code", "message"], properties: { code: { type: "string", pattern: "^FERRY_" }, message: { type: "string" }, hint: { type: "string" } } },
      ItemResults: {
        type: "object",
        description: "one result per item: ok with a value, or an error",
        properties: {
          command: { type: "string", description: "the scheduler command that carried the change" },
          applied: { type: "boolean", description: "false (with HTTP 202) when no scheduler applied it yet" },
          hint: { type: "string" },
          items: arrayOf({
            type: "object",
            required: ["id", "ok"],
            properties: { id: { type: "string" }, ok: { type: "boolean" }, value: { type: "object" }, error: ref("ErrorDetail") },
          }),
        },
      },
      Project: {
        type: "object",
        properties: {
          project: { type: "string" },
          description: { type: "string" },
          jobsets: { type: "integer" },
          declarative: {
            type: ["object", "null"],
            properties: { repo: { type: "string" }, branch: { type: "string" }, file: { type: "string" }, checkInterval: { type: "integer" }, checkedAt: { type: ["string", "null"] }, error: { type: ["string", "null"] } },
          },
          changes: arrayOf({ type: "object", properties: { jobset: { type: "string" }, action: { enum: ["create", "update", "disable", "unchanged"] } } }),
        },
      },
      ProjectInput: {
        type: "object",
        properties: {
          description: { type: "string" },
          declarative: {
            type: ["object", "null"],
            description: "jobsets declared in a JSON file of a repository (null: stop); read now and at checkInterval",
            required: ["repo", "file"],
            properties: { repo: { type: "string" }, branch: { type: "string", default: "main" }, file: { type: "string" }, checkInterval: { type: "integer", default: 300 } },
          },
        },
      },
      JobsetInput: {
        type: "object",
        properties: {
          repo: { type: "string" },
          file: { type: "string" },
          branch: { type: "string", default: "main" },
          attr: { type: ["string", "null"] },
          checkInterval: { type: "integer", minimum: 0, default: 300, description: "seconds; 0: only on demand" },
          state: { type: "integer", enum: [0, 1, 2], description: "0 disabled, 1 enabled, 2 one-shot" },
          shares: { type: "integer", minimum: 1, default: 100 },
        },
      },
      Jobset: {
        type: "object",
        properties: {
          project: { type: "string" },
          jobset: { type: "string" },
          repo: { type: "string" },
          branch: { type: "string" },
          file: { type: "string" },
          attr: { type: ["string", "null"] },
          checkInterval: { type: "integer" },
          state: { type: "integer" },
          stateName: { enum: ["disabled", "enabled", "one-shot"] },
          shares: { type: "integer" },
          declarative: { type: "boolean" },
          lastCheckedAt: { type: ["string", "null"] },
          triggeredAt: { type: ["string", "null"] },
          error: { type: ["string", "null"] },
          lastEvaluation: { type: ["object", "null"] },
          builds: { type: "object", additionalProperties: { type: "integer" }, description: "builds of the latest evaluation by status" },
        },
      },
      Evaluation: {
        type: "object",
        properties: {
          id: { type: "string" },
          revision: { type: ["string", "null"] },
          startedAt: { type: "string" },
          evalMs: { type: ["integer", "null"] },
          error: { type: ["string", "null"] },
          builds: { type: "integer" },
          changed: { type: "integer" },
        },
      },
      EvaluationOutcome: {
        type: "object",
        properties: {
          status: { enum: ["evaluated", "unchanged", "failed"] },
          evaluation: { type: "string" },
          revision: { type: "string" },
          builds: { type: "integer" },
          newSteps: { type: "integer" },
          changedJobs: { type: "integer" },
          error: ref("ErrorDetail"),
          started: { type: "boolean" },
        },
      },
      Diff: {
        type: "object",
        properties: {
          evaluation: ref("Evaluation"),
          against: { oneOf: [ref("Evaluation"), { type: "null" }] },
          added: arrayOf({ type: "string" }),
          removed: arrayOf({ type: "string" }),
          changed: arrayOf({ type: "string" }),
          stepsNeeded: { type: "integer", description: "unfinished steps the added and changed jobs need" },
        },
      },
      Build: {
        type: "object",
        properties: {
          id: { type: "string" },
          project: { type: "string" },
          jobset: { type: "string" },
          job: { type: "string" },
          evaluation: { type: "string" },
          drvPath: { type: "string" },
          system: { type: "string" },
          status: { enum: ["queued", "succeeded", "failed", "dependency-failed", "cancelled"] },
          outputs: { type: "object", additionalProperties: { type: "string" } },
          isAggregate: { type: "boolean" },
          createdAt: { type: "string" },
          finishedAt: { type: ["string", "null"] },
          step: { type: ["object", "null"], properties: { id: { type: "string" }, status: { type: "string" } } },
          members: arrayOf({ type: "object" }),
          memberOf: arrayOf({ type: "string" }),
        },
      },
      Token: {
        type: "object",
        properties: {
          id: { type: "string" },
          role: { enum: ["admin", "worker", "read-only", "public-read"] },
          description: { type: "string" },
          createdAt: { type: "string" },
          token: { type: "string", description: "only when made" },
        },
      },
      Webhook: {
        type: "object",
        properties: {
          id: { type: "string" },
          url: { type: "string" },
          events: arrayOf({ enum: ["build:finished", "step:finished", "evaluation:finished"] }),
          project: { type: ["string", "null"] },
          description: { type: "string" },
          secret: { type: "string", description: "only when made" },
          deliveries: { type: "object" },
        },
      },
    },
  },
  paths: {
    "/api/health": { get: op({ summary: "liveness and the database kind", access: "public", responses: { "200": json({ type: "object" }) } }) },
    "/api/openapi.json": { get: op({ summary: "this document", access: "public", responses: { "200": json({ type: "object" }) } }) },
    "/metrics": { get: op({ summary: "Prometheus metrics (text)", access: "read", responses: { "200": { description: "text/plain; version=0.0.4", content: { "text/plain": { schema: { type: "string" } } } } } }) },
    "/api/projects": { get: op({ summary: "all projects", access: "read", responses: { "200": json(arrayOf(ref("Project"))) } }) },
    "/api/projects/{project}": {
      get: op({ summary: "a project", access: "read", params: [P.project], responses: { "200": json(ref("Project")) } }),
      put: op({
        summary: "create or change a project; with `declarative`, its jobsets come from a file in a repository",
        description: "The declaration file is a JSON object: jobset name → { file, repo?, branch?, attr?, checkInterval?, state?, shares? }. It is read (and checked) before anything is written.",
        access: "admin",
        params: [P.project],
        body: ref("ProjectInput"),
        responses: { "200": json(ref("Project")) },
      }),
    },
    "/api/projects/{project}/jobsets": { get: op({ summary: "a project's jobsets", access: "read", params: [P.project], responses: { "200": json(arrayOf(ref("Jobset"))) } }) },
    "/api/projects/{project}/jobsets/{jobset}": {
      get: op({ summary: "a jobset, its latest evaluation and its builds by status", access: "read", params: js, responses: { "200": json(ref("Jobset")) } }),
      put: op({ summary: "create or replace a jobset (not in declarative projects: 409)", access: "admin", params: js, body: ref("JobsetInput"), responses: { "200": json(ref("Jobset")) } }),
      patch: op({ summary: "change some of a jobset's fields (enable, disable, …)", access: "admin", params: js, body: ref("JobsetInput"), responses: { "200": json(ref("Jobset")) } }),
    },
    "/api/projects/{project}/jobsets/{jobset}/trigger": {
      post: op({ summary: "make the jobset due now (evaluated by the next check)", access: "admin", params: js, responses: { "202": json({ type: "object" }) } }),
    },
    "/api/projects/{project}/jobsets/{jobset}/evaluations": {
      get: op({ summary: "the jobset's evaluations, newest first (at most 100)", access: "read", params: js, responses: { "200": json(arrayOf(ref("Evaluation"))) } }),
      post: op({
        summary: "evaluate the jobset now",
        access: "admin",
        params: js,
        query: [{ name: "wait", in: "query", schema: { enum: ["1"] }, description: "answer when the evaluation ends" }],
        responses: { "200": json(ref("EvaluationOutcome")), "202": json(ref("EvaluationOutcome"), "started") },
      }),
    },
    "/api/projects/{project}/jobsets/{jobset}/evaluations/{id}/diff": {
      get: op({
        summary: "jobs added, removed and changed since another evaluation (default: the previous successful one)",
        access: "read",
        params: [...js, { ...P.id, description: "an evaluation id, or `latest`", schema: { type: "string" } }],
        query: [{ name: "against", in: "query", schema: { type: "string" }, description: "the evaluation to compare with" }],
        responses: { "200": json(ref("Diff")) },
      }),
    },
    "/api/projects/{project}/jobsets/{jobset}/builds": {
      get: op({ summary: "the builds of the jobset's latest successful evaluation", access: "read", params: js, responses: { "200": json(arrayOf(ref("Build"))) } }),
    },
    "/api/projects/{project}/jobsets/{jobset}/jobs/{job}/latest-finished": {
      get: op({
        summary: "the newest succeeded build of a job whose evaluation has no queued builds (the channel / release URL)",
        access: "read",
        params: [...js, P.job],
        responses: { "200": json(ref("Build")) },
      }),
    },
    "/api/projects/{project}/jobsets/{jobset}/jobs/{job}/latest-finished/{output}": {
      get: op({
        summary: "the store path of one output of the job's latest finished build (text; JSON with Accept: application/json or ?format=json)",
        access: "read",
        params: [...js, P.job, P.output],
        responses: {
          "200": {
            description: "the store path",
            content: { "text/plain": { schema: { type: "string" } }, "application/json": { schema: { type: "object", properties: { build: { type: "string" }, job: { type: "string" }, output: { type: "string" }, path: { type: "string" } } } } },
          },
        },
      }),
    },
    "/api/builds/{id}": { get: op({ summary: "a build, its step, its aggregate members and the aggregates it belongs to", access: "read", params: [P.id], responses: { "200": json(ref("Build")) } }) },
    "/api/builds/restart": {
      post: op({ summary: "queue failed, dependency-failed or cancelled builds again", access: "admin", body: buildSelection, responses: { "200": json(ref("ItemResults")), "202": json(ref("ItemResults"), "not applied yet") } }),
    },
    "/api/builds/cancel": {
      post: op({ summary: "cancel queued builds (and the steps only they need)", access: "admin", body: buildSelection, responses: { "200": json(ref("ItemResults")), "202": json(ref("ItemResults"), "not applied yet") } }),
    },
    "/api/builds/bump": {
      post: op({ summary: "give queued builds a priority", access: "admin", body: buildSelection, responses: { "200": json(ref("ItemResults")), "202": json(ref("ItemResults"), "not applied yet") } }),
    },
    "/api/tokens": {
      get: op({ summary: "stored tokens (without their secrets)", access: "admin", responses: { "200": json(arrayOf(ref("Token"))) } }),
      post: op({
        summary: "make a token (shown once)",
        access: "admin",
        body: { type: "object", required: ["role"], properties: { role: { enum: ["admin", "worker", "read-only", "public-read"] }, description: { type: "string" } } },
        responses: { "201": json(ref("Token")) },
      }),
    },
    "/api/tokens/{id}": { delete: op({ summary: "revoke a stored token", access: "admin", params: [P.id], responses: { "200": json({ type: "object" }) } }) },
    "/api/webhooks": {
      get: op({ summary: "outgoing webhooks and their delivery counts", access: "admin", responses: { "200": json(arrayOf(ref("Webhook"))) } }),
      post: op({
        summary: "add an outgoing webhook (its secret is shown once)",
        description: "Events are POSTed as JSON { delivery, event, eventId, createdAt, payload } with X-Ferry-Event, X-Ferry-Delivery and X-Ferry-Signature-256: sha256=HMAC(body, secret); retried with backoff until a 2xx answer.",
        access: "admin",
        body: {
          type: "object",
          required: ["url"],
          properties: { url: { type: "string" }, events: arrayOf({ type: "string" }), project: { type: "string" }, secret: { type: "string" }, description: { type: "string" } },
        },
        responses: { "201": json(ref("Webhook")) },
      }),
    },
    "/api/webhooks/{id}": { delete: op({ summary: "remove an outgoing webhook", access: "admin", params: [P.id], responses: { "200": json({ type: "object" }) } }) },
    "/api/webhooks/{id}/deliveries": { get: op({ summary: "a webhook's latest 100 deliveries", access: "admin", params: [P.id], responses: { "200": json(arrayOf({ type: "object" })) } }) },
    "/api/hooks/git": {
      post: op({
        summary: "push webhook of a git host: the enabled jobsets on that repository and branch become due",
        description: "GitHub, Gitea/Forgejo and GitLab push payloads: { ref: refs/heads/BRANCH, repository: { clone_url | ssh_url | git_http_url | … } }. Declarative projects declared in that repository are re-read.",
        access: "self",
        body: { type: "object", properties: { ref: { type: "string" }, repository: { type: "object" }, project: { type: "object" } } },
        responses: { "200": json({ type: "object", properties: { jobsets: arrayOf({ type: "string" }), projects: arrayOf({ type: "string" }) } }) },
      }),
    },
    "/api/worker": {
      get: op({
        summary: "a build machine's WebSocket (Upgrade: websocket; worker token); the protocol is in src/farm/protocol.ts",
        access: "worker",
        dispatcher: true,
        responses: { "101": { description: "switching to the worker protocol" } },
      }),
    },
    "/api/workers": {
      get: op({ summary: "connected build machines (a coordinator that does not lead answers 307 to the leader)", access: "read", responses: { "200": json(arrayOf({ type: "object" })), "307": { description: "ask the scheduling leader, at Location" } } }),
    },
    "/api/workers/{id}/drain": {
      post: op({ summary: "let a build machine finish its steps and take no new ones (a coordinator that does not lead answers 307 to the leader)", access: "admin", params: [P.id], responses: { "200": json({ type: "object" }), "307": { description: "ask the scheduling leader, at Location" } } }),
    },
    "/api/steps/{id}": { get: op({ summary: "a step: its derivation, status, machine, timings", access: "read", params: [P.id], responses: { "200": json({ type: "object" }) } }) },
    "/api/steps/{id}/log": {
      get: op({
        summary: "a step's build log (text); with follow, streamed as the step runs",
        description:
          "Without follow: the log's bytes from offset to its end now (with Content-Length). With follow=1: a chunked answer that sends what the log has, then what is appended, and ends once the step has finished (no longer queued or running) and its log was read to the end; the coordinator looks for new bytes and the step's status every 200 ms. " +
          "A client that loses the connection asks again with offset = the bytes it got. A retried step's log starts again (a follower goes on with the new attempt). " +
          "A coordinator that does not schedule answers 307 to the scheduling leader's same URL when it has no log for the step.",
        access: "read",
        params: [P.id],
        query: [
          { name: "follow", in: "query", schema: { enum: ["1", "true", "0", "false"] }, description: "keep sending the log as it grows until the step has finished" },
          { name: "offset", in: "query", schema: { type: "integer", minimum: 0, default: 0 }, description: "the first byte to send" },
        ],
        responses: {
          "200": { description: "the log (chunked with follow)", content: { "text/plain": { schema: { type: "string" } } } },
          "307": { description: "the log is kept by the scheduling leader: ask the URL in Location (with the same token)", headers: { Location: { schema: { type: "string" } } } },
          "416": json(ref("Error"), "offset is beyond the log's end (FERRY_FARM_LOG_OFFSET): it started again, ask without offset"),
        },
      }),
    },
  },
};
