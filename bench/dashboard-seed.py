#!/usr/bin/env python3
"""Seeds a meterd journal (SQLite, already migrated by `meterd run`) for the dashboard benchmark, directly in the file.

Usage: bench/dashboard-seed.py JOURNAL [--subs 1000] [--dims 10] [--days 730] [--hours-per-day 1]

Writes, for every subscription x dimension x day of the last `days` days (UTC): `hours-per-day` hourly totals
(from 12:00), each frozen into an outbound event: `accepted` (9 in 10) or `included`, `pending` for the last day
(deadline 24 h after the hour, less the default safety margin); the subscription list (Subscribed, plan `gold`,
monthly terms from the 1st), `resource_spellings`, the term's `term_usage`, and a few thresholds fired. This is
much faster than the API (which would carry hours older than the 24-hour window into the open hour); the browser
test seeds through the API instead.
"""
import argparse
import datetime as dt
import sqlite3
import sys
import time
import uuid

p = argparse.ArgumentParser()
p.add_argument("journal")
p.add_argument("--subs", type=int, default=1000)
p.add_argument("--dims", type=int, default=10)
p.add_argument("--days", type=int, default=730)
p.add_argument("--hours-per-day", type=int, default=1)
a = p.parse_args()

HOUR = 3600
now = int(time.time())
today = now - now % 86400
first = dt.datetime.fromtimestamp(today, dt.timezone.utc).replace(day=1)
term_start = int(first.timestamp())
term_end = int((first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)).timestamp())
subs = [str(uuid.UUID(int=(0x5EED << 112) + i, version=4)) for i in range(a.subs)]
dims = [f"dim{d}" for d in range(a.dims)]

c = sqlite3.connect(a.journal)
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=OFF")
# A 1 GiB page cache: the bulk inserts and the index builds below touch gigabytes; the default 2 MB cache makes
# them re-read pages from the file all the time.
c.execute("PRAGMA cache_size=-1048576")
started = time.time()


def phase(what):
    print(f"  {time.time() - started:5.0f} s: {what}", file=sys.stderr, flush=True)

with c:
    c.executemany(
        "INSERT OR REPLACE INTO subscriptions (id, status, plan, offer, term_start, term_end, term_unit, updated_at)"
        " VALUES (?, 'Subscribed', 'gold', 'bench-offer', ?, ?, 'P1M', ?)",
        [(s, term_start, term_end, now) for s in subs],
    )
    c.executemany("INSERT OR IGNORE INTO resource_spellings (folded, spelling) VALUES (?, ?)", [(s, s) for s in subs])


# Bulk load in SQL (one INSERT ... SELECT per table over generated keys and days), with the secondary indexes
# dropped during the load and built again after it: minutes instead of an hour through executemany.
indexes = c.execute(
    "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ('hourly_totals', 'outbound_events')"
).fetchall()
names = c.execute(
    "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ('hourly_totals', 'outbound_events')"
).fetchall()
with c:
    for (name,) in names:
        c.execute(f"DROP INDEX {name}")
    c.execute("CREATE TEMP TABLE bench_subs (si INTEGER PRIMARY KEY, id TEXT)")
    c.executemany("INSERT INTO bench_subs VALUES (?, ?)", list(enumerate(subs)))
    c.execute("CREATE TEMP TABLE bench_dims (di INTEGER PRIMARY KEY, id TEXT)")
    c.executemany("INSERT INTO bench_dims VALUES (?, ?)", list(enumerate(dims)))
    c.execute("CREATE TEMP TABLE bench_hours (day INTEGER, h INTEGER, hour INTEGER)")
    c.executemany(
        "INSERT INTO bench_hours VALUES (?, ?, ?)",
        [(day, h, today - day * 86400 + (12 + h) * HOUR) for day in range(a.days, -1, -1) for h in range(a.hours_per_day)
         if today - day * 86400 + (12 + h) * HOUR + HOUR <= now],
    )
    base = c.execute("SELECT COALESCE(MAX(id), 0) FROM outbound_events").fetchone()[0]
    nh = c.execute("SELECT COUNT(*) FROM bench_hours").fetchone()[0]
    # Every (subscription, dimension, hour) with its quantity and outcome, generated inside SQLite. CROSS JOIN
    # fixes the loop order (subscription, dimension, hour), which is the order of the ids, of the unique index
    # (resource, dimension, hour) and of the hourly totals' primary key: every insert appends, nothing is sorted.
    c.execute(
        """CREATE TEMP VIEW bench_gen AS
           SELECT s.si, s.id AS sid, d.di, d.id AS did, y.rn, y.hour,
                  ((s.si * 7 + d.di * 13 + y.day * 3 + y.h) % 50 + 1) * 250000 AS q,
                  CASE WHEN y.hour >= (SELECT v FROM bench_params WHERE k = 'pending_from') THEN 'pending'
                       WHEN (s.si + d.di + y.day) % 10 = 0 THEN 'included' ELSE 'accepted' END AS st
           FROM bench_subs s CROSS JOIN bench_dims d CROSS JOIN bench_y y"""
    )
    c.execute("CREATE TEMP TABLE bench_params (k TEXT PRIMARY KEY, v INTEGER)")
    c.execute("INSERT INTO bench_params VALUES ('pending_from', ?)", (now - 86400 + HOUR,))
    c.execute(
        "CREATE TEMP TABLE bench_y AS SELECT row_number() OVER (ORDER BY hour) - 1 AS rn, hour, day, h"
        " FROM bench_hours ORDER BY hour"
    )
    phase("generating the outbound events")
    c.execute(
        """INSERT INTO outbound_events (id, resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
               deadline, frozen_at, finished_at, term_start, send_quantity, included)
           SELECT ?1 + (si * ?2 + di) * ?3 + rn + 1, sid, 'gold', did, hour, q, '{}', st, hour + 7200,
                  hour + 86100, hour + 7200, CASE WHEN st = 'pending' THEN NULL ELSE hour + 7200 END,
                  CASE WHEN hour >= ?4 THEN ?4 END,
                  CASE WHEN st = 'accepted' THEN q ELSE 0 END, CASE WHEN st = 'included' THEN q ELSE 0 END
           FROM bench_gen""",
        (base, len(dims), nh, term_start),
    )
    phase("the hourly totals")
    c.execute(
        """INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
           SELECT resource, 'gold', dimension, hour, quantity, 1, id FROM outbound_events WHERE id > ?""",
        (base,),
    )
    n = len(subs) * len(dims) * nh
    phase(f"{n} hourly totals and events; building the indexes")
    for (sql,) in indexes:
        c.execute(sql)
    phase("term usage and thresholds")
    # The term's usage from the generator (what the events of the term hold, pending ones aside), not by reading
    # the events back.
    c.execute(
        "INSERT OR REPLACE INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage)"
        " SELECT sid, did, 'gold', ?1, ?2, SUM(q), SUM(CASE WHEN st = 'accepted' THEN q ELSE 0 END) FROM bench_gen"
        " WHERE hour >= ?1 AND st != 'pending' GROUP BY sid, did",
        (term_start, term_end),
    )
    c.executemany(
        "INSERT OR IGNORE INTO thresholds_fired (resource, dimension, term_start, threshold, fired_at)"
        " VALUES (?, 'dim0', ?, '80%', ?)",
        [(s, term_start, now) for s in subs[::7]],
    )
    phase("committing")

c.close()
print(f"seeded {a.subs} subscriptions x {a.dims} dimensions x {a.days} days x {a.hours_per_day} h: "
      f"{n} hourly totals and outbound events in {time.time() - started:.0f} s", flush=True)
