//! Schema and migrations, versioned by `PRAGMA user_version`.
//!
//! Each entry of [`MIGRATIONS`] moves the schema from version `i` to `i + 1` and runs in the same immediate
//! transaction as the version bump, so a crash leaves either the old or the new schema, never half of one.
//! Never edit a released migration: append a new one.

use rusqlite::Connection;

/// Ordered migrations; index `i` upgrades from `user_version = i`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Raw usage as acknowledged. `hour` is where the quantity is counted; `origin_hour` the hour of `event_time`
    -- (they differ when the record was carried forward). `idem_key` is unique: the idempotency guarantee.
    CREATE TABLE usage_records (
        seq         INTEGER PRIMARY KEY,
        idem_key    TEXT UNIQUE,
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        event_time  INTEGER NOT NULL,
        origin_hour INTEGER NOT NULL,
        hour        INTEGER NOT NULL,
        quantity    INTEGER NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE INDEX usage_records_received ON usage_records(received_at);

    -- Exact hourly sums in micro-units. `plan` is the plan given on the records ('' when none was given; the
    -- emitter resolves it). `carried_in` is the part of `quantity` moved here from earlier hours.
    -- `outbound_id` is set when the hour is frozen.
    CREATE TABLE hourly_totals (
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        hour        INTEGER NOT NULL,
        quantity    INTEGER NOT NULL,
        records     INTEGER NOT NULL,
        carried_in  INTEGER NOT NULL DEFAULT 0,
        outbound_id INTEGER,
        PRIMARY KEY (resource, plan, dimension, hour)
    ) WITHOUT ROWID;
    CREATE INDEX hourly_totals_hour ON hourly_totals(hour);

    -- Every quantity moved from one hour to a later one, and why ('late': arrived after its hour was frozen or
    -- outside the window; 'expired': its outbound event ran out of window).
    CREATE TABLE carries (
        id          INTEGER PRIMARY KEY,
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        from_hour   INTEGER NOT NULL,
        to_hour     INTEGER NOT NULL,
        quantity    INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        outbound_id INTEGER,
        created_at  INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX carries_key ON carries(resource, plan, dimension, from_hour, to_hour, reason)
        WHERE outbound_id IS NULL;

    -- Frozen outbound events: one per (resource, dimension, hour) ever. `quantity` is fixed at freezing; `body`
    -- is written once, before the first attempt (when the plan is known), and sent byte for byte on every attempt.
    -- `state` is 'pending' until a terminal outcome. `held` says why a pending event is not being sent (the
    -- subscription is not active yet); `ambiguous` that some attempt may have been recorded without an answer.
    CREATE TABLE outbound_events (
        id                INTEGER PRIMARY KEY,
        resource          TEXT NOT NULL,
        plan              TEXT NOT NULL,
        dimension         TEXT NOT NULL,
        hour              INTEGER NOT NULL,
        quantity          INTEGER NOT NULL,
        body              TEXT NOT NULL,
        state             TEXT NOT NULL,
        attempts          INTEGER NOT NULL DEFAULT 0,
        next_attempt_at   INTEGER NOT NULL,
        deadline          INTEGER NOT NULL,
        ambiguous         INTEGER NOT NULL DEFAULT 0,
        held              TEXT,
        in_flight         INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        usage_event_id    TEXT,
        market_quantity   INTEGER,
        carried_to        INTEGER,
        frozen_at         INTEGER NOT NULL,
        finished_at       INTEGER,
        UNIQUE (resource, dimension, hour)
    );
    CREATE INDEX outbound_events_state ON outbound_events(state, hour);

    -- What meterd last saw of each SaaS subscription; `unsubscribed_seen_at` is when it first saw the
    -- cancellation (hours closed before it are still sent).
    CREATE TABLE subscriptions (
        id                   TEXT PRIMARY KEY,
        status               TEXT NOT NULL,
        plan                 TEXT NOT NULL,
        offer                TEXT NOT NULL,
        term_start           INTEGER,
        term_end             INTEGER,
        term_unit            TEXT,
        unsubscribed_seen_at INTEGER,
        updated_at           INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Single-flight emission across processes: whoever holds an unexpired lease sends.
    CREATE TABLE leases (
        name       TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 2: billing policy (included quantities, billing units, thresholds) and alerts.
    r#"
    -- Raw usage that already went through the allowance (carried after expiry): billed as it stands.
    ALTER TABLE hourly_totals ADD COLUMN prebilled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbound_events ADD COLUMN prebilled INTEGER NOT NULL DEFAULT 0;
    -- Set once, with the body: what the allowance covered, what was billable (overage + prebilled + the
    -- remainder carried in, raw units), and what was sent (billing units, micro-units).
    ALTER TABLE outbound_events ADD COLUMN included INTEGER;
    ALTER TABLE outbound_events ADD COLUMN billable INTEGER;
    ALTER TABLE outbound_events ADD COLUMN send_quantity INTEGER;
    ALTER TABLE outbound_events ADD COLUMN term_start INTEGER;

    -- Consumption per subscription term and plan (a plan change starts a fresh allowance).
    CREATE TABLE term_usage (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        plan       TEXT NOT NULL,
        term_start INTEGER NOT NULL,
        term_end   INTEGER NOT NULL,
        consumed   INTEGER NOT NULL DEFAULT 0,
        overage    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (resource, dimension, plan, term_start)
    ) WITHOUT ROWID;

    -- The part of a billing unit not yet sent, per subscription and dimension (never reset, never lost).
    CREATE TABLE remainders (
        resource  TEXT NOT NULL,
        dimension TEXT NOT NULL,
        remainder INTEGER NOT NULL,
        PRIMARY KEY (resource, dimension)
    ) WITHOUT ROWID;

    CREATE TABLE thresholds_fired (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        term_start INTEGER NOT NULL,
        threshold  TEXT NOT NULL,
        fired_at   INTEGER NOT NULL,
        PRIMARY KEY (resource, dimension, term_start, threshold)
    ) WITHOUT ROWID;

    -- Alerts to deliver to alerts.webhook_url; `dedupe` makes each fire once.
    CREATE TABLE alerts (
        id              INTEGER PRIMARY KEY,
        kind            TEXT NOT NULL,
        dedupe          TEXT NOT NULL UNIQUE,
        body            TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        delivered_at    INTEGER,
        last_error      TEXT
    );
    CREATE INDEX alerts_undelivered ON alerts(delivered_at, next_attempt_at);
    "#,
    // 3: per-key freezing and one spelling per resource.
    r#"
    -- The freeze pass selects the totals not frozen yet (any closed hour: late usage goes into its own hour while
    -- its key has no outbound event) through this index, not by scanning every total kept for reports.
    CREATE INDEX hourly_totals_unfrozen ON hourly_totals(hour) WHERE outbound_id IS NULL;

    -- Resource ids and managed-app URIs are case-insensitive on the marketplace: every spelling of one resource
    -- is journaled as the first one seen (`folded` is its ASCII lower case), so two casings aggregate into one
    -- key and the wire carries the first spelling. Filled from what existing journals hold, events first.
    CREATE TABLE resource_spellings (
        folded   TEXT PRIMARY KEY,
        spelling TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO resource_spellings (folded, spelling)
        SELECT lower(resource), resource FROM outbound_events ORDER BY hour, id;
    INSERT OR IGNORE INTO resource_spellings (folded, spelling)
        SELECT lower(resource), resource FROM hourly_totals ORDER BY hour;
    "#,
    // 4: the fleet outbox (docs/fleet.md).
    r#"
    -- 1 while a record ingested in fleet mode is not yet in the shared PostgreSQL journal (the forwarder clears
    -- it after the PostgreSQL commit). Retention never compacts a record while it is 1. Records of a journal
    -- that ran alone are 0: they were reported by this journal's own emitter and must not be forwarded.
    ALTER TABLE usage_records ADD COLUMN forward_pending INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX usage_records_outbox ON usage_records(seq) WHERE forward_pending = 1;
    "#,
    // 5 (pools): credit pools, their audit trail, and what each drew per outbound event.
    r#"
    -- The customer of a SaaS subscription (the list's beneficiary.tenantId, lower case), for customer pools.
    ALTER TABLE subscriptions ADD COLUMN tenant TEXT;

    -- Credit pools from [[pools]] (source 'config') and POST /v1/pools (source 'api'). `spec` is the pool in the
    -- API's JSON form (what idempotent creation compares); `amount` NULL is infinite; `voided_at`: no further draws.
    CREATE TABLE pools (
        id           TEXT PRIMARY KEY,
        dimension    TEXT NOT NULL,
        spec         TEXT NOT NULL,
        source       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        voided_at    INTEGER
    ) WITHOUT ROWID;

    -- Every change to a pool: who (`config`, `api`), when, what (created, updated, voided) and the spec after it.
    CREATE TABLE pool_changes (
        id       INTEGER PRIMARY KEY,
        pool_id  TEXT NOT NULL,
        at       INTEGER NOT NULL,
        who      TEXT NOT NULL,
        action   TEXT NOT NULL,
        spec     TEXT NOT NULL
    );
    CREATE INDEX pool_changes_pool ON pool_changes(pool_id, id);

    -- What each pool (other than the plan allowance, which is outbound_events.included minus these) covered of
    -- each outbound event, in the pool's period starting at `period_start`. Written with the event's body.
    -- Kept when retention deletes the event: a pool's balance is its periods' amounts minus these.
    CREATE TABLE pool_draws (
        outbound_id  INTEGER NOT NULL,
        pool_id      TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        quantity     INTEGER NOT NULL,
        resource     TEXT NOT NULL,
        dimension    TEXT NOT NULL,
        hour         INTEGER NOT NULL,
        PRIMARY KEY (outbound_id, pool_id)
    ) WITHOUT ROWID;
    CREATE INDEX pool_draws_pool ON pool_draws(pool_id, period_start);

    -- Monthly sums of the hourly totals retention deleted, so GET /v1/consumption?group_by=month reaches back
    -- further than journal.retention.
    CREATE TABLE usage_months (
        resource  TEXT NOT NULL,
        dimension TEXT NOT NULL,
        month     INTEGER NOT NULL,
        quantity  INTEGER NOT NULL,
        PRIMARY KEY (resource, dimension, month)
    ) WITHOUT ROWID;

    -- Pool thresholds fired ('80%', 'exhausted', 'expiring'): once per pool and period.
    CREATE TABLE pool_thresholds_fired (
        pool_id      TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        threshold    TEXT NOT NULL,
        fired_at     INTEGER NOT NULL,
        PRIMARY KEY (pool_id, period_start, threshold)
    ) WITHOUT ROWID;
    "#,
    // 6: the dashboard's and the balances' reads per subscription and dimension over a time range.
    r#"
    -- Balances (`billing::balance`: the term's usage not billed yet) and the dashboard's usage chart read one
    -- resource's totals per dimension and hour range; the primary key leads with the plan after the resource, so
    -- without this index they scan every hour the resource has (years of them).
    CREATE INDEX hourly_totals_resource_dimension_hour ON hourly_totals(resource, dimension, hour);
    "#,
    // 7: outcome counts for `GET /v1/status` and `meterd status`, kept by triggers; the pending events by deadline.
    r#"
    -- Per outcome (`state`, with `expired` events carried elsewhere as 'carried'): how many outbound events the
    -- journal holds, their quantity, and the latest `finished_at` ever seen in it. Status read these by scanning
    -- every event (minutes on years of events); the triggers below keep them in the same statement as every
    -- insert, settle and delete of an event, so they always equal
    --   SELECT <outcome>, COUNT(*), SUM(quantity) FROM outbound_events GROUP BY <outcome>
    -- (rows of zero events stay, with events = 0). `last_finished` only grows: retention deleting old events
    -- does not forget when the marketplace last accepted one.
    CREATE TABLE outcome_totals (
        outcome       TEXT PRIMARY KEY,
        events        INTEGER NOT NULL,
        quantity      INTEGER NOT NULL,
        last_finished INTEGER
    ) WITHOUT ROWID;
    INSERT INTO outcome_totals (outcome, events, quantity, last_finished)
        SELECT CASE WHEN state = 'expired' AND carried_to IS NOT NULL THEN 'carried' ELSE state END AS s,
               COUNT(*), SUM(quantity), MAX(finished_at)
        FROM outbound_events GROUP BY s;
    CREATE TRIGGER outcome_totals_insert AFTER INSERT ON outbound_events BEGIN
        INSERT INTO outcome_totals (outcome, events, quantity, last_finished)
            VALUES (CASE WHEN NEW.state = 'expired' AND NEW.carried_to IS NOT NULL THEN 'carried' ELSE NEW.state END,
                    1, NEW.quantity, NEW.finished_at)
            ON CONFLICT (outcome) DO UPDATE SET events = events + 1, quantity = quantity + excluded.quantity,
                last_finished = MAX(COALESCE(last_finished, excluded.last_finished),
                                    COALESCE(excluded.last_finished, last_finished));
    END;
    CREATE TRIGGER outcome_totals_update AFTER UPDATE OF state, carried_to, quantity, finished_at ON outbound_events
    BEGIN
        UPDATE outcome_totals SET events = events - 1, quantity = quantity - OLD.quantity
            WHERE outcome = CASE WHEN OLD.state = 'expired' AND OLD.carried_to IS NOT NULL THEN 'carried'
                                 ELSE OLD.state END;
        INSERT INTO outcome_totals (outcome, events, quantity, last_finished)
            VALUES (CASE WHEN NEW.state = 'expired' AND NEW.carried_to IS NOT NULL THEN 'carried' ELSE NEW.state END,
                    1, NEW.quantity, NEW.finished_at)
            ON CONFLICT (outcome) DO UPDATE SET events = events + 1, quantity = quantity + excluded.quantity,
                last_finished = MAX(COALESCE(last_finished, excluded.last_finished),
                                    COALESCE(excluded.last_finished, last_finished));
    END;
    -- The pending events in deadline order with what status, the dashboard's at-risk list and its cards read of
    -- them (hour, key, hold): those reads (`INDEXED BY` this index) touch the pending events only, and the at-risk
    -- list its first rows only, instead of every pending row of the table through the state index.
    CREATE INDEX outbound_events_pending ON outbound_events(deadline, hour, resource, dimension, held)
        WHERE state = 'pending';
    CREATE TRIGGER outcome_totals_delete AFTER DELETE ON outbound_events BEGIN
        UPDATE outcome_totals SET events = events - 1, quantity = quantity - OLD.quantity
            WHERE outcome = CASE WHEN OLD.state = 'expired' AND OLD.carried_to IS NOT NULL THEN 'carried'
                                 ELSE OLD.state END;
    END;
    "#,
    // 8: what retention deleted of a billing term, per (resource, dimension, term): the overage its events froze
    // and the marketplace accepted, and the usage of its hourly totals. A term longer than `journal.retention`
    // (a 3-year plan against the default 730 days) keeps an exact balance after its first hours are deleted (the
    // shared journal's `retired_overage` does the same in fleet mode).
    r#"
    CREATE TABLE retired_overage (
        resource   TEXT NOT NULL,
        dimension  TEXT NOT NULL,
        term_start INTEGER NOT NULL,
        frozen     INTEGER NOT NULL DEFAULT 0,
        accepted   INTEGER NOT NULL DEFAULT 0,
        usage      INTEGER NOT NULL DEFAULT 0,
        events     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (resource, dimension, term_start)
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the database up to [`current_version`], one immediate transaction per step.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<i64> {
    loop {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version >= current_version() {
            return Ok(version);
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Re-read inside the lock: another process may have migrated meanwhile.
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < current_version() {
            tx.execute_batch(MIGRATIONS[version as usize])?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        }
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal of schema 2 (global freeze watermark, resources as spelled) keeps working after migration 3:
    /// each resource's first spelling (events first) becomes the journaled one, and the freeze query uses the
    /// partial index of unfrozen totals.
    #[test]
    fn migration_3_keeps_old_journals_and_indexes_unfrozen_totals() {
        let mut conn = Connection::open_in_memory().unwrap();
        for m in &MIGRATIONS[..2] {
            conn.execute_batch(m).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 2").unwrap();
        conn.execute_batch(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at, deadline, frozen_at)
                 VALUES ('/subscriptions/X/providers/App', '', 'd', 7200, 1, '', 'accepted', 0, 0, 0);
             INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records)
                 VALUES ('/subscriptions/x/providers/app', '', 'd', 3600, 1, 1),
                        ('/subscriptions/y/providers/App', '', 'd', 3600, 1, 1),
                        ('/subscriptions/Y/providers/App', '', 'd', 7200, 1, 1);",
        )
        .unwrap();
        // Read-only commands (`meterd report`, `status`) of this build read a journal an older daemon still runs.
        let now = chrono::DateTime::from_timestamp(10 * 3600, 0).unwrap();
        let filter = crate::journal::usage::ReportFilter {
            resource: Some("/SUBSCRIPTIONS/Y/PROVIDERS/APP".into()),
            ..Default::default()
        };
        let rows =
            crate::journal::usage::hourly_report(&conn, &filter, now, chrono::Duration::minutes(5))
                .unwrap();
        assert_eq!(
            rows.len(),
            2,
            "any letter case finds the resource: {rows:?}"
        );
        crate::journal::usage::carry_report(&conn, &filter).unwrap();
        assert_eq!(
            crate::journal::status::status(&conn, now)
                .unwrap()
                .unfrozen_hours,
            2
        );
        assert_eq!(migrate(&mut conn).unwrap(), current_version());
        let spelling = |folded: &str| -> String {
            conn.query_row(
                "SELECT spelling FROM resource_spellings WHERE folded = ?1",
                [folded],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(
            spelling("/subscriptions/x/providers/app"),
            "/subscriptions/X/providers/App"
        );
        assert_eq!(
            spelling("/subscriptions/y/providers/app"),
            "/subscriptions/y/providers/App"
        );
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT resource, plan, dimension, hour, quantity, prebilled FROM hourly_totals
                 WHERE outbound_id IS NULL AND hour < 10000 ORDER BY hour, resource, dimension, plan",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("hourly_totals_unfrozen"), "{plan}");
    }

    /// Read-only commands of this build (`meterd balance`, `report`) read a journal of schema 3 (no pool tables)
    /// that an older daemon still runs: the balance has the plan pool only, and the pool listing is empty.
    #[test]
    fn a_journal_without_the_pool_tables_still_answers_balances() {
        let mut conn = Connection::open_in_memory().unwrap();
        for m in &MIGRATIONS[..3] {
            conn.execute_batch(m).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 3").unwrap();
        let settings = crate::config::load_str_for(
            "[journal]\npath = \"/nonexistent/j.db\"\n[[dimensions]]\nid = \"api_calls\"\n[[plans]]\nid = \"gold\"\nincluded = { api_calls = 5 }\n",
            "test",
            &Default::default(),
            crate::config::Credentials::Optional,
        )
        .unwrap();
        let now = chrono::DateTime::from_timestamp(10 * 3600, 0).unwrap();
        let b = crate::journal::billing::balance(&conn, &settings, "r", now).unwrap();
        assert_eq!(b[0].pools.len(), 1);
        assert!(b[0].pools[0].id.starts_with("plan:"));
        assert!(crate::journal::pools::all(&conn).unwrap().is_empty());
        // Migrating adds the tables.
        migrate(&mut conn).unwrap();
        assert!(crate::journal::pools::has_schema(&conn).unwrap());
    }
}
