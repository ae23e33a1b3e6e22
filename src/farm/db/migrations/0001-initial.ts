/**
 * The farm's first schema: projects and jobsets, evaluations with their jobs, builds (one per
 * job per evaluation) and steps (one per derivation to build, shared by every build that needs
 * it), the step graph, machines (workers) and tokens. Steps are claimed with
 * `FOR UPDATE SKIP LOCKED` and carry a lease, so several coordinators can share the database.
 */
import type { Kysely } from "kysely";
import { runStatements } from "./statements.js";

export const name = "0001-initial";

const SCHEMA = `
    create table projects (
      id serial primary key,
      name text not null unique,
      description text not null default '',
      created_at timestamptz not null default now()
    );
    create table jobsets (
      id serial primary key,
      project_id integer not null references projects(id) on delete cascade,
      name text not null,
      repo text not null,
      branch text not null default 'main',
      file text not null,
      attr text,
      check_interval_s integer not null default 300 check (check_interval_s >= 0),
      -- 0 disabled, 1 enabled, 2 one-shot
      state smallint not null default 1 check (state in (0, 1, 2)),
      shares integer not null default 100 check (shares > 0),
      trigger_at timestamptz,
      last_checked_at timestamptz,
      last_inputs_hash text,
      error text,
      unique (project_id, name)
    );
    create table evaluations (
      id bigserial primary key,
      jobset_id integer not null references jobsets(id) on delete cascade,
      inputs_hash text not null,
      revision text,
      started_at timestamptz not null default now(),
      finished_at timestamptz,
      eval_ms integer,
      error text,
      nr_builds integer not null default 0,
      nr_new integer not null default 0
    );
    create index evaluations_jobset on evaluations (jobset_id, id desc);
    create table steps (
      id bigserial primary key,
      drv_path text not null unique,
      name text not null,
      system text not null,
      features text[] not null default '{}',
      -- queued, running, succeeded, failed, dependency-failed, cancelled
      status text not null default 'queued',
      bump integer not null default 0,
      attempts integer not null default 0,
      not_before timestamptz,
      lease_owner text,
      lease_expires_at timestamptz,
      machine text,
      started_at timestamptz,
      finished_at timestamptz,
      duration_ms integer,
      error text,
      created_at timestamptz not null default now()
    );
    create index steps_runnable on steps (system, status) where status = 'queued';
    create index steps_leases on steps (lease_expires_at) where status = 'running';
    create table step_deps (
      step_id bigint not null references steps(id) on delete cascade,
      depends_on bigint not null references steps(id) on delete cascade,
      primary key (step_id, depends_on)
    );
    create index step_deps_reverse on step_deps (depends_on);
    create table builds (
      id bigserial primary key,
      evaluation_id bigint not null references evaluations(id) on delete cascade,
      jobset_id integer not null references jobsets(id) on delete cascade,
      job text not null,
      drv_path text not null,
      system text not null,
      outputs jsonb not null default '{}',
      is_aggregate boolean not null default false,
      -- queued, succeeded, failed, dependency-failed, cancelled
      status text not null default 'queued',
      created_at timestamptz not null default now(),
      finished_at timestamptz,
      unique (evaluation_id, job)
    );
    create index builds_job on builds (jobset_id, job, id desc);
    create table build_steps (
      build_id bigint not null references builds(id) on delete cascade,
      step_id bigint not null references steps(id) on delete cascade,
      primary key (build_id, step_id)
    );
    create table aggregate_members (
      aggregate_id bigint not null references builds(id) on delete cascade,
      member_id bigint not null references builds(id) on delete cascade,
      primary key (aggregate_id, member_id)
    );
    create table failed_paths (
      drv_path text primary key,
      failed_at timestamptz not null default now(),
      error text
    );
    create table machines (
      id text primary key,
      systems text[] not null,
      features text[] not null default '{}',
      mandatory_features text[] not null default '{}',
      max_jobs integer not null check (max_jobs > 0),
      speed_factor real not null default 1,
      load real not null default 0,
      free_disk_bytes bigint,
      draining boolean not null default false,
      last_seen_at timestamptz not null default now()
    );
    create table tokens (
      hash text primary key,
      role text not null check (role in ('admin', 'worker', 'read-only', 'public-read')),
      description text not null default '',
      created_at timestamptz not null default now()
    )
`;

export const up = (db: Kysely<unknown>): Promise<void> => runStatements(db, SCHEMA);
