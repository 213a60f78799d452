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
started = time.time()
with c:
    c.executemany(
        "INSERT OR REPLACE INTO subscriptions (id, status, plan, offer, term_start, term_end, term_unit, updated_at)"
        " VALUES (?, 'Subscribed', 'gold', 'bench-offer', ?, ?, 'P1M', ?)",
        [(s, term_start, term_end, now) for s in subs],
    )
    c.executemany("INSERT OR IGNORE INTO resource_spellings (folded, spelling) VALUES (?, ?)", [(s, s) for s in subs])


def rows():
    oid = c.execute("SELECT COALESCE(MAX(id), 0) FROM outbound_events").fetchone()[0]
    for si, s in enumerate(subs):
        for di, d in enumerate(dims):
            for day in range(a.days, -1, -1):
                for h in range(a.hours_per_day):
                    hour = today - day * 86400 + (12 + h) * HOUR
                    if hour + HOUR > now:
                        continue
                    q = ((si * 7 + di * 13 + day * 3 + h) % 50 + 1) * 250_000  # 0.25 .. 12.5
                    oid += 1
                    if hour >= now - 86400 + HOUR:
                        state = "pending"
                    elif (si + di + day) % 10 == 0:
                        state = "included"
                    else:
                        state = "accepted"
                    yield oid, s, d, hour, q, state


BATCH = 200_000
buf = []
n = 0


def flush():
    global buf
    with c:
        c.executemany(
            "INSERT INTO outbound_events (id, resource, plan, dimension, hour, quantity, body, state, next_attempt_at,"
            " deadline, frozen_at, finished_at, term_start, send_quantity, included)"
            " VALUES (?, ?, 'gold', ?, ?, ?, '{}', ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (oid, s, d, hour, q, state, hour + 2 * HOUR, hour + 86400 - 300, hour + 2 * HOUR,
                 None if state == "pending" else hour + 2 * HOUR, term_start if hour >= term_start else None,
                 q if state == "accepted" else 0, q if state == "included" else 0)
                for oid, s, d, hour, q, state in buf
            ],
        )
        c.executemany(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)"
            " VALUES (?, 'gold', ?, ?, ?, 1, ?)",
            [(s, d, hour, q, oid) for oid, s, d, hour, q, state in buf],
        )
    buf = []


for r in rows():
    buf.append(r)
    n += 1
    if len(buf) >= BATCH:
        flush()
        print(f"  {n} hourly totals ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
flush()
with c:
    c.execute(
        "INSERT OR REPLACE INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage)"
        " SELECT resource, dimension, 'gold', ?, ?, SUM(quantity), SUM(send_quantity) FROM outbound_events"
        " WHERE hour >= ? AND state != 'pending' GROUP BY resource, dimension",
        (term_start, term_end, term_start),
    )
    c.executemany(
        "INSERT OR IGNORE INTO thresholds_fired (resource, dimension, term_start, threshold, fired_at)"
        " VALUES (?, 'dim0', ?, '80%', ?)",
        [(s, term_start, now) for s in subs[::7]],
    )

c.close()
print(f"seeded {a.subs} subscriptions x {a.dims} dimensions x {a.days} days x {a.hours_per_day} h: "
      f"{n} hourly totals and outbound events in {time.time() - started:.0f} s", flush=True)
