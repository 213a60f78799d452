//! The fleet journal's PostgreSQL schema, versioned, applied at start by every replica.
//!
//! The tables mirror the SQLite journal's (`journal/schema.rs`, same names, same columns, times as unix seconds
//! in `BIGINT`, quantities as `BIGINT` micro-units) plus what a fleet needs: `records` from every replica (unique
//! per idempotency key across the fleet), `replicas` (heartbeat and forward watermark), and per-event leases with
//! a fencing counter on `outbound_events`. Migrations run under a transaction-scoped advisory lock
//! (`pg_advisory_xact_lock`, released by the commit; no session lock, so PgBouncer in transaction mode is fine),
//! so replicas starting at once apply each step exactly once.

use tokio_postgres::Client;

/// The advisory lock key taken (per transaction) while migrating: "meterd" in ASCII.
const MIGRATION_LOCK: i64 = 0x6d65_7465_7264;

/// Each entry moves the schema from version `i` to `i + 1`. Append only; never edit a step once released.
const MIGRATIONS: &[&str] = &[
    // 1: the fleet journal.
    r#"
    -- One row per fleet-wide setting: `frozen_through` (never moves backwards), as in the SQLite `meta`.
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );

    -- Every record forwarded by any replica. `idem_key` is the client's id, or the key generated at ingest for a
    -- record without one; it is the fleet-wide idempotency guarantee (`INSERT ... ON CONFLICT DO NOTHING`).
    -- `hour` is where the quantity is counted (its own hour, or the open hour it was carried into).
    CREATE TABLE records (
        idem_key     TEXT PRIMARY KEY,
        replica      TEXT NOT NULL,
        resource     TEXT NOT NULL,
        plan         TEXT NOT NULL,
        dimension    TEXT NOT NULL,
        event_time   BIGINT NOT NULL,
        origin_hour  BIGINT NOT NULL,
        hour         BIGINT NOT NULL,
        quantity     BIGINT NOT NULL,
        received_at  BIGINT NOT NULL,
        forwarded_at BIGINT NOT NULL
    );
    CREATE INDEX records_received ON records(received_at);

    -- As in SQLite: the exact sum per (resource, plan, dimension, hour); `outbound_id` once frozen.
    CREATE TABLE hourly_totals (
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        hour        BIGINT NOT NULL,
        quantity    BIGINT NOT NULL,
        records     BIGINT NOT NULL,
        carried_in  BIGINT NOT NULL DEFAULT 0,
        prebilled   BIGINT NOT NULL DEFAULT 0,
        outbound_id BIGINT,
        PRIMARY KEY (resource, plan, dimension, hour)
    );
    CREATE INDEX hourly_totals_hour ON hourly_totals(hour);
    CREATE INDEX hourly_totals_unfrozen ON hourly_totals(hour) WHERE outbound_id IS NULL;

    CREATE TABLE carries (
        id          BIGSERIAL PRIMARY KEY,
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        from_hour   BIGINT NOT NULL,
        to_hour     BIGINT NOT NULL,
        quantity    BIGINT NOT NULL,
        reason      TEXT NOT NULL,
        outbound_id BIGINT,
        created_at  BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX carries_key ON carries(resource, plan, dimension, from_hour, to_hour, reason)
        WHERE outbound_id IS NULL;

    -- As in SQLite, plus the per-event lease: `lease_owner` (a replica), `lease_until` (database clock, unix
    -- seconds) and `fence`, incremented by every claim; a settle must present the fence it claimed with.
    CREATE TABLE outbound_events (
        id                BIGSERIAL PRIMARY KEY,
        resource          TEXT NOT NULL,
        plan              TEXT NOT NULL,
        dimension         TEXT NOT NULL,
        hour              BIGINT NOT NULL,
        quantity          BIGINT NOT NULL,
        body              TEXT NOT NULL,
        state             TEXT NOT NULL,
        attempts          BIGINT NOT NULL DEFAULT 0,
        next_attempt_at   BIGINT NOT NULL,
        deadline          BIGINT NOT NULL,
        ambiguous         BIGINT NOT NULL DEFAULT 0,
        held              TEXT,
        in_flight         BIGINT NOT NULL DEFAULT 0,
        last_error        TEXT,
        usage_event_id    TEXT,
        market_quantity   BIGINT,
        carried_to        BIGINT,
        frozen_at         BIGINT NOT NULL,
        finished_at       BIGINT,
        prebilled         BIGINT NOT NULL DEFAULT 0,
        included          BIGINT,
        billable          BIGINT,
        send_quantity     BIGINT,
        term_start        BIGINT,
        lease_owner       TEXT,
        lease_until       BIGINT,
        fence             BIGINT NOT NULL DEFAULT 0,
        UNIQUE (resource, dimension, hour)
    );
    CREATE INDEX outbound_events_state ON outbound_events(state, hour);
    CREATE INDEX outbound_events_due ON outbound_events(next_attempt_at) WHERE state = 'pending';

    CREATE TABLE resource_spellings (
        folded   TEXT PRIMARY KEY,
        spelling TEXT NOT NULL
    );

    CREATE TABLE subscriptions (
        id                   TEXT PRIMARY KEY,
        status               TEXT NOT NULL,
        plan                 TEXT NOT NULL,
        offer                TEXT NOT NULL,
        term_start           BIGINT,
        term_end             BIGINT,
        term_unit            TEXT,
        unsubscribed_seen_at BIGINT,
        updated_at           BIGINT NOT NULL
    );

    CREATE TABLE term_usage (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        plan       TEXT NOT NULL,
        term_start BIGINT NOT NULL,
        term_end   BIGINT NOT NULL,
        consumed   BIGINT NOT NULL DEFAULT 0,
        overage    BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (resource, dimension, plan, term_start)
    );

    CREATE TABLE remainders (
        resource  TEXT NOT NULL,
        dimension TEXT NOT NULL,
        remainder BIGINT NOT NULL,
        PRIMARY KEY (resource, dimension)
    );

    CREATE TABLE thresholds_fired (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        term_start BIGINT NOT NULL,
        threshold  TEXT NOT NULL,
        fired_at   BIGINT NOT NULL,
        PRIMARY KEY (resource, dimension, term_start, threshold)
    );

    CREATE TABLE alerts (
        id              BIGSERIAL PRIMARY KEY,
        kind            TEXT NOT NULL,
        dedupe          TEXT NOT NULL UNIQUE,
        body            TEXT NOT NULL,
        created_at      BIGINT NOT NULL,
        attempts        BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        delivered_at    BIGINT,
        last_error      TEXT
    );
    CREATE INDEX alerts_undelivered ON alerts(delivered_at, next_attempt_at);

    -- One row per replica: when it last said it is alive (`heartbeat_at`, database clock) and its forward
    -- watermark (every record it received before `watermark` is in `records`).
    CREATE TABLE replicas (
        replica_id   TEXT PRIMARY KEY,
        started_at   BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL,
        watermark    BIGINT NOT NULL,
        unforwarded  BIGINT NOT NULL DEFAULT 0,
        version      TEXT NOT NULL
    );
    "#,
    // 2: retention of the shared journal (`journal/pg/retention.rs`).
    r#"
    -- Monthly sums of the hourly totals retention deleted (as in SQLite), so GET /v1/consumption?group_by=month
    -- (and dimension) reaches back further than journal.retention. `month` is the month's first second (UTC).
    CREATE TABLE usage_months (
        resource  TEXT NOT NULL,
        dimension TEXT NOT NULL,
        month     BIGINT NOT NULL,
        quantity  BIGINT NOT NULL,
        PRIMARY KEY (resource, dimension, month)
    );

    -- What the outbound events retention deleted had frozen (`send_quantity`) and the marketplace accepted, per
    -- term: a balance's `overage_frozen` / `overage_accepted` add these, so they stay exact after deletion.
    CREATE TABLE retired_overage (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        term_start BIGINT NOT NULL,
        frozen     BIGINT NOT NULL DEFAULT 0,
        accepted   BIGINT NOT NULL DEFAULT 0,
        events     BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (resource, dimension, term_start)
    );

    -- Retention's scans: settled events by hour, the totals of an event, carries by origin hour.
    CREATE INDEX outbound_events_settled ON outbound_events(hour, id) WHERE state <> 'pending';
    CREATE INDEX hourly_totals_outbound ON hourly_totals(outbound_id) WHERE outbound_id IS NOT NULL;
    CREATE INDEX carries_from ON carries(from_hour);
    "#,
    // 3: the usage of the hourly totals retention deleted, per term (as SQLite's schema 8): a balance's `usage`
    // (all usage of the term, every plan's) reaches back past retention.
    r#"
    ALTER TABLE retired_overage ADD COLUMN usage BIGINT NOT NULL DEFAULT 0;
    "#,
    // 4: room on each page of `outbound_events` for the new versions of its rows. An event is updated four
    // times while pending (claim, bill and body, mark, settle); the first three change no indexed column, so
    // with room on the page they are HOT updates: no new entry in any of the table's indexes, less WAL, and the
    // claims' scan of the `(state, hour)` index does not wade through one dead entry per update. A frozen row
    // is about 190 bytes and grows to about 420 with its body, so 30% leaves room for both (docs/performance.md,
    // "fleet-emit2"). A storage parameter only: no rewrite, existing pages keep their rows, pages used from now
    // on take the setting; replicas of version 3 run on unchanged.
    r#"
    ALTER TABLE outbound_events SET (fillfactor = 30);
    "#,
    // 5: room for HOT updates of the hourly totals. Every forwarded batch adds to the totals of its keys (an
    // update of each; none of its columns indexed): with full pages an update moves the row to another page and
    // writes an entry in each of the table's indexes, and the table bloats (a total of the open hour is updated
    // once per batch). With half of each page free the update stays on its page (heap-only tuple, no index
    // entry); docs/performance.md, "fleet-forward2". Only pages written from now on leave the room (no rewrite).
    r#"
    ALTER TABLE hourly_totals SET (fillfactor = 50);
    "#,
];

/// The schema version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the database up to [`current_version`]: one transaction per step under a transaction-scoped advisory
/// lock, re-reading the version inside it, so replicas starting at once never apply a step twice. A database
/// newer than this build is refused (an older binary must not write a newer schema).
pub async fn migrate(client: &mut Client) -> Result<i64, tokio_postgres::Error> {
    loop {
        let tx = client.transaction().await?;
        // The lock first: even `CREATE TABLE IF NOT EXISTS` races with itself on the catalog.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS meterd_schema (
                 one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                 version BIGINT NOT NULL
             );
             INSERT INTO meterd_schema (one, version) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;",
        )
        .await?;
        let version: i64 = tx
            .query_one("SELECT version FROM meterd_schema", &[])
            .await?
            .get(0);
        if version >= current_version() {
            tx.commit().await?;
            return Ok(version);
        }
        tx.batch_execute(MIGRATIONS[version as usize]).await?;
        tx.execute("UPDATE meterd_schema SET version = $1", &[&(version + 1)])
            .await?;
        tx.commit().await?;
    }
}
