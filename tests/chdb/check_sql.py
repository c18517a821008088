"""Runs every migration and every store query on a current ClickHouse (chDB).

ClickHouse 18.16, the server the integration tests start, is old; production
runs current releases. This script applies migrations/*.sql in order to an
embedded ClickHouse 26.x (PyPI `chdb`), loads a small known trace, runs each
query of services/store/src/queries/ with its `?` placeholders bound, and
checks the answers. Exit status 0 means both engines accept the same SQL.

The checks only need a function that runs one statement and returns its CSV
answer (`run_checks(query)`), so the same checks can be pointed at a server.

Usage: python check_sql.py   (needs `pip install chdb`; `make chdb-venv` does it)
"""

import csv
import decimal
import io
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((ROOT / "migrations").glob("*.sql"))
# The columns of migration 0001, in order: later migrations add more (with defaults).
SAMPLE_COLUMNS = (
    "(customer, sandbox, node, epoch, seq, ts, ts_ms, state, vcpu_milli, mem_bytes, gpu_model, gpu_count, disk_bytes, cpu_used_usec, net_rx_bytes, net_tx_bytes, vcpu_alloc_usec, mem_alloc_kib_ms, mem_used_kib_ms, gpu_alloc_ms, disk_mib_ms, api_calls, mem_used_bytes, exec_sessions, open_conns)"
)
QUERIES = ROOT / "services" / "store" / "src" / "queries"

# 2026-11-01 10:00:00 UTC (1793527200) and the trace of tests/tests/end_to_end.rs.
HOUR_10 = 1793527200
HOUR_11 = HOUR_10 + 3600
HOUR_12 = HOUR_10 + 7200
DAY = HOUR_10 - 10 * 3600  # 2026-11-01 00:00:00 UTC, the trace's day
OCTOBER = DAY - 31 * 86400  # 2026-10-01 00:00:00 UTC
TRACE = [
    # sandbox, epoch, seq, ts, cpu_used_usec
    ("sbx-a", 1, 1, HOUR_10 + 3598, 1000),
    ("sbx-a", 1, 2, HOUR_10 + 3599, 3000),
    ("sbx-a", 1, 3, HOUR_10 + 3600, 6000),
    ("sbx-a", 1, 4, HOUR_10 + 3601, 10000),
    ("sbx-b", 1, 1, HOUR_10 + 1800, 500),
    ("sbx-b", 1, 2, HOUR_10 + 1860, 900),
    ("sbx-b", 2, 1, HOUR_10 + 1920, 100),
    ("sbx-b", 2, 2, HOUR_10 + 1980, 400),
]


def statements(sql: str):
    """Same rule as idlemeter-store's Migration::statements."""
    text = "\n".join(l for l in sql.splitlines() if not l.lstrip().startswith("--"))
    for statement in text.split(";\n"):
        statement = statement.strip().rstrip(";").strip()
        if statement:
            yield statement


def bind(sql: str, params):
    """Client-side binding, as idlemeter-store does it: `{name}` placeholders
    (the store's `statement!`) or, in the statements that still use them,
    `?` (every `?` of the text, comments included). Values are given in the
    placeholders' order; a name given two different values is an error (the
    store binds one value per name)."""
    pieces = re.split(r"\?(?!fields)|\{([a-z_][a-z0-9_]*)\}", sql)
    texts, names = pieces[0::2], pieces[1::2]
    if len(names) != len(params):
        raise ValueError(f"{len(names)} placeholders (comments included), {len(params)} params")
    seen = {}
    out = texts[0]
    for name, value, rest in zip(names, params, texts[1:]):
        if name is not None and seen.setdefault(name, value) != value:
            raise ValueError(f"{{{name}}} given {seen[name]!r} and {value!r}")
        out += (f"'{value}'" if isinstance(value, str) else str(value)) + rest
    return out


def canon(cell: str) -> str:
    """A CSV cell with Decimal trailing zeros dropped ("0.050000000000" and
    "0.05" are the same amount; 18.16 prints the first, current releases the
    second)."""
    if "." in cell:
        try:
            return format(decimal.Decimal(cell).normalize(), "f")
        except decimal.InvalidOperation:
            pass
    return cell


def parse(text: str):
    return [[canon(cell) for cell in row] for row in csv.reader(io.StringIO(text)) if row]


def sample(customer, sbx, node, epoch, seq, ts, cpu, state="running", vcpu_milli=2000, mem_bytes=0,
           gpu_model="", gpu_count=0, disk_bytes=0, exec_sessions=1, open_conns=0):
    """One usage_samples row; vcpu_alloc_usec is seq * 2,000,000, the other counters 0."""
    return (
        f"('{customer}','{sbx}','{node}',{epoch},{seq},{ts},{ts * 1000},'{state}',{vcpu_milli},{mem_bytes},"
        f"'{gpu_model}',{gpu_count},{disk_bytes},{cpu},0,0,{seq * 2000000},0,0,0,0,0,0,{exec_sessions},{open_conns})"
    )


def window(sbx, epoch, bucket, samples, cpu, vcpu):
    """An expected usage window row: cpu and vcpu are (lo, hi); every other counter is 0."""
    zeros = ["0"] * 4
    return [sbx, str(epoch), str(bucket), str(samples),
            str(cpu[0]), "0", "0", str(vcpu[0]), *zeros,
            str(cpu[1]), "0", "0", str(vcpu[1]), *zeros]


def rated(customer, period_start, as_of, checksum, line_no, kind, resource, amount, rated_at):
    return (
        f"('{customer}', {period_start}, {as_of}, 's', '{checksum}', 'p', 'USD', {line_no}, '{kind}', "
        f"'{resource}', '', '1', '1', 'h', '1', '{amount}', {rated_at})"
    )


def run_checks(query) -> int:
    """query(sql) runs one statement in an empty database and returns its CSV answer."""

    def check_query(name, label, params, expected) -> bool:
        try:
            sql = bind((QUERIES / name).read_text(), params)
            got = parse(query(sql))
        except Exception as error:  # noqa: BLE001 - reported as the check's failure
            print(f"FAIL {name} ({label}): {error}")
            return False
        if got != expected:
            print(f"FAIL {name} ({label})\n got      {got}\n expected {expected}")
            return False
        return True

    for migration in MIGRATIONS:
        for statement in statements(migration.read_text()):
            query(statement)
        # Applying twice must be harmless: IF NOT EXISTS everywhere, and for
        # ADD COLUMN (which 18.16 cannot guard) the runner's rule in
        # services/store/src/migrate.rs: "already exists" means applied.
        for statement in statements(migration.read_text()):
            try:
                query(statement)
            except Exception as error:
                adds = " ".join(statement.split()).upper()
                if not (adds.startswith("ALTER TABLE ") and " ADD COLUMN " in adds
                        and "column with this name already exists" in str(error)):
                    raise
        print(f"ok  {migration.name}")

    rows = ",".join(sample("acme", sbx, "node-1", epoch, seq, ts, cpu) for sbx, epoch, seq, ts, cpu in TRACE)
    query(f"INSERT INTO usage_samples {SAMPLE_COLUMNS} VALUES {rows}")
    query(f"INSERT INTO usage_samples {SAMPLE_COLUMNS} VALUES {rows}")  # a replay
    # Ingest writes a row per sandbox-minute beside the samples; migration
    # 0010's backfill writes the same rows from stored samples (and, through
    # its view, the hours). Twice, as a replay would.
    minute_rows = [statement for statement in statements((ROOT / "migrations" / "0010_compacted.sql").read_text())
                   if statement.lstrip().startswith("INSERT INTO usage_minutes")]
    assert len(minute_rows) == 1, "migration 0010 has one backfill"
    query(minute_rows[0])
    query(minute_rows[0])

    # Hour windows. Hour 10 holds sbx-a seqs 1-2, sbx-b's four samples; hour
    # 11 sbx-a seqs 3-4. vcpu_alloc_usec is seq * 2 s.
    name = "usage_window_rollup.sql"
    a_h10 = window("sbx-a", 1, HOUR_10, 2, (1000, 3000), (2000000, 4000000))
    a_h11 = window("sbx-a", 1, HOUR_11, 2, (6000, 10000), (6000000, 8000000))
    b1_h10 = window("sbx-b", 1, HOUR_10, 2, (500, 900), (2000000, 4000000))
    b2_h10 = window("sbx-b", 2, HOUR_10, 2, (100, 400), (2000000, 4000000))
    hour = (HOUR_10, 3600, 3600, "acme", HOUR_12, "a", "z", "acme", HOUR_10, HOUR_12, "a", "z")
    if not check_query(name, "hours 10-11", hour, [a_h10, a_h11, b1_h10, b2_h10]):
        return 1
    # From hour 11: hour 10 of sbx-a folds into bucket 0 (its baseline, with
    # hour 10's 2 samples); sbx-b has no sample in the range, so none of it.
    hour_11 = (HOUR_11, 3600, 3600, "acme", HOUR_12, "a", "z", "acme", HOUR_11, HOUR_12, "a", "z")
    baseline = window("sbx-a", 1, 0, 2, (1000, 3000), (2000000, 4000000))
    if not check_query(name, "hour 11, hour 10 as baseline", hour_11, [baseline, a_h11]):
        return 1
    only_b = (HOUR_10, 3600, 3600, "acme", HOUR_12, "sbx-b", "sbx-b", "acme", HOUR_10, HOUR_12, "sbx-b", "sbx-b")
    if not check_query(name, "sandbox range sbx-b..=sbx-b", only_b, [b1_h10, b2_h10]):
        return 1
    # One day window: each (sandbox, epoch) becomes a single bucket at 00:00.
    day = (DAY, 86400, 86400, "acme", DAY + 86400, "a", "z", "acme", DAY, DAY + 86400, "a", "z")
    expected = [
        window("sbx-a", 1, DAY, 4, (1000, 10000), (2000000, 8000000)),
        window("sbx-b", 1, DAY, 2, (500, 900), (2000000, 4000000)),
        window("sbx-b", 2, DAY, 2, (100, 400), (2000000, 4000000)),
    ]
    if not check_query(name, "one day", day, expected):
        return 1
    print(f"ok  {name}")

    # Minute windows. Binds: customer, from_hour, first, last, customer, from,
    # to, first, last, from, customer, from_hour, to, first, last, customer,
    # from, to, first, last.
    name = "usage_window_minute.sql"
    # [10:31, 11:01): sbx-b epoch 1's first sample (10:30:00) precedes the
    # range and is its bucket 0; every other sample is in its own minute.
    start, end = HOUR_10 + 1860, HOUR_11 + 60
    minutes = ("acme", HOUR_10, "a", "z", "acme", start, end, "a", "z", start, "acme", HOUR_10, end, "a", "z",
               "acme", start, end, "a", "z")
    b_minutes = [
        window("sbx-b", 1, 0, 1, (500, 500), (2000000, 2000000)),
        window("sbx-b", 1, HOUR_10 + 1860, 1, (900, 900), (4000000, 4000000)),
        window("sbx-b", 2, HOUR_10 + 1920, 1, (100, 100), (2000000, 2000000)),
        window("sbx-b", 2, HOUR_10 + 1980, 1, (400, 400), (4000000, 4000000)),
    ]
    expected = [
        window("sbx-a", 1, HOUR_10 + 3540, 2, (1000, 3000), (2000000, 4000000)),
        window("sbx-a", 1, HOUR_11, 2, (6000, 10000), (6000000, 8000000)),
        *b_minutes,
    ]
    if not check_query(name, "10:31 to 11:01", minutes, expected):
        return 1
    only_b = ("acme", HOUR_10, "sbx-b", "sbx-b", "acme", start, end, "sbx-b", "sbx-b", start,
              "acme", HOUR_10, end, "sbx-b", "sbx-b", "acme", start, end, "sbx-b", "sbx-b")
    if not check_query(name, "sandbox range sbx-b..=sbx-b", only_b, b_minutes):
        return 1
    # [11:00, 11:01): hour 10 comes from the rollup as sbx-a's bucket 0 (no
    # sample counted there); sbx-b has no sample in the range.
    minutes = ("acme", HOUR_11, "a", "z", "acme", HOUR_11, HOUR_11 + 60, "a", "z", HOUR_11,
               "acme", HOUR_11, HOUR_11 + 60, "a", "z", "acme", HOUR_11, HOUR_11 + 60, "a", "z")
    expected = [
        window("sbx-a", 1, 0, 0, (1000, 3000), (2000000, 4000000)),
        window("sbx-a", 1, HOUR_11, 2, (6000, 10000), (6000000, 8000000)),
    ]
    if not check_query(name, "11:00 to 11:01, hour 10 from the rollup", minutes, expected):
        return 1
    # [11:01, 11:02): no sample in the range, so no epoch is read at all (not
    # even a baseline of the samples between 11:00 and 11:01).
    start, end = HOUR_11 + 60, HOUR_11 + 120
    minutes = ("acme", HOUR_11, "a", "z", "acme", start, end, "a", "z", start,
               "acme", HOUR_11, end, "a", "z", "acme", start, end, "a", "z")
    if not check_query(name, "11:01 to 11:02, nothing in the range", minutes, []):
        return 1
    print(f"ok  {name}")

    sql = (QUERIES / "samples_for_rating.sql").read_text()
    # sbx-a's samples closing in hour 11, plus its last sample of hour 10 as
    # baseline; sbx-b has nothing in hour 11, so none of its samples. One
    # customer (first = last), then a range of customers.
    h11, h12 = HOUR_11 * 1000, HOUR_12 * 1000
    expected = [('"sbx-a"', "2"), ('"sbx-a"', "3"), ('"sbx-a"', "4")]
    for label, first, last in (("one customer", "acme", "acme"), ("a range", "a", "z")):
        params = (first, last, h11, h12, first, last, h11, first, last, h11, h12)
        result = query(bind(sql, params))
        got = [tuple(line.split(",")[1:5:3]) for line in result.strip().splitlines()]
        if got != expected:
            print(f"FAIL samples_for_rating.sql ({label})\n got      {got}\n expected {expected}")
            return 1
        print(f"ok  samples_for_rating.sql ({label})")

    # Rated usage: Decimal(38, 12) money summed per checksum (no decimal GROUP BY key).
    query(
        "INSERT INTO rated_usage VALUES ('acme', 0, 3600, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', "
        "'1.5', '1500', 'vcpu-hour', '0.01667', '0.03', 1), ('acme', 0, 3600, 's', 'c1', 'p', 'USD', 1, "
        "'usage', 'memory', '', '2', '2', 'GB-hour', '0.00833', '0.02', 1)"
    )
    total = query(
        "SELECT sheet_checksum, sum(amount) AS total FROM rated_usage FINAL WHERE customer = 'acme' "
        "AND period_start = toDateTime(0) AND as_of = toDateTime(3600) GROUP BY sheet_checksum"
    ).strip()
    if total not in ('"c1",0.05', '"c1",0.050000000000'):
        print(f"FAIL rated_usage totals: {total}")
        return 1
    print("ok  rated_usage totals")
    # An older snapshot of the same period must not be what period_spend reads.
    query(
        "INSERT INTO rated_usage VALUES ('acme', 0, 1800, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', "
        "'1', '1', 'vcpu-hour', '9', '9', 1)"
    )
    # period_start_unix, sheet_checksum, as_of_unix, total, spend.
    if not check_query("period_spend.sql", "latest snapshot", ("acme", "acme", "acme"), [["0", "c1", "3600", "0.05", "0.05"]]):
        return 1
    # A re-run rewrites the vcpu line (0.03 -> 0.04): 0.04 + 0.02, read FINAL.
    query(
        "INSERT INTO rated_usage VALUES ('acme', 0, 3600, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', "
        "'1', '1', 'vcpu-hour', '0.04', '0.04', 2)"
    )
    if not check_query("period_spend.sql", "a rewritten line", ("acme", "acme", "acme"), [["0", "c1", "3600", "0.06", "0.06"]]):
        return 1
    # A re-rating under checksum c2 of the same hour, rated later, supersedes c1.
    query(
        "INSERT INTO rated_usage VALUES ('acme', 0, 3600, 's', 'c2', 'p', 'USD', 0, 'usage', 'vcpu', '', "
        "'1', '1', 'vcpu-hour', '0.07', '0.07', 3)"
    )
    if not check_query("period_spend.sql", "a re-rating", ("acme", "acme", "acme"), [["0", "c2", "3600", "0.07", "0.07"]]):
        return 1
    print("ok  period_spend.sql")

    # Live figures: the newest as_of per line survives; a line the newest
    # figure lacks is left out; lines come in order.
    query(
        "INSERT INTO live_usage VALUES "
        "('acme', 0, 100, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', '1', '1', 'h', '1', '0.01', 100),"
        "('acme', 0, 100, 's', 'c1', 'p', 'USD', 2, 'usage', 'gpu', '', '1', '1', 'h', '1', '0.05', 100)"
    )
    query(
        "INSERT INTO live_usage VALUES "
        "('acme', 0, 105, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', '1', '1', 'h', '1', '0.02', 105),"
        "('acme', 0, 105, 's', 'c1', 'p', 'USD', 1, 'usage', 'memory', '', '1', '1', 'h', '1', '0.03', 105)"
    )
    live = (QUERIES / "live_lines.sql").read_text().replace("?fields", "line_no, resource, amount")
    got = parse(query(bind(live, ("acme", 0, "c1", "acme", 0, "c1"))))
    if got != [["0", "vcpu", "0.02"], ["1", "memory", "0.03"]]:
        print(f"FAIL live_lines.sql\n got      {got}")
        return 1
    print("ok  live_lines.sql")

    # Carried states: the newest per customer in range (as_of is the merge
    # version: one row per customer, period and checksum survives).
    # Columns: customer, period_start, sheet_checksum, as_of, series, state,
    # rated_at, usage, samples, revision, counts_rated. beta's 3600 state was
    # re-rated (same as_of, newer revision: b2 wins); gamma's count was
    # written before migration 0017 (counts_rated 0) and reads as 0.
    query(
        "INSERT INTO rating_state VALUES ('acme', 0, 'c1', 3600, 1, 's1', 1, '1x1 0.0=1', 0, 1, 1), "
        "('acme', 0, 'c1', 7200, 1, 's2', 1, '1x1 0.0=2', 9, 2, 1), "
        "('beta', 0, 'c1', 3600, 1, 'b1', 1, '1x1 0.0=3', 4, 3, 1), "
        "('beta', 0, 'c1', 3600, 1, 'b2', 2, '1x1 0.0=4', 5, 4, 1), "
        "('gamma', 0, 'c1', 3600, 1, 'g1', 1, '1x1 0.0=5', 7, 5, 0), "
        "('beta', 0, 'c2', 7200, 1, 'other', 1, '', 0, 5, 1), ('zeta', 0, 'c1', 3600, 1, 'z1', 1, '', 0, 6, 1)"
    )
    if not check_query("rating_states.sql", "newest before", ("acme", "gamma", 0, "c1", 7200),
                       [["acme", "7200", "s2", "9"], ["beta", "3600", "b2", "5"], ["gamma", "3600", "g1", "0"]]):
        return 1
    print("ok  rating_states.sql")
    # customer, as_of, rated_at, usage, samples.
    if not check_query("rated_quantities.sql", "newest, re-rated wins", ("acme", "gamma", 0, "c1"),
                       [["acme", "7200", "1", "1x1 0.0=2", "9"], ["beta", "3600", "2", "1x1 0.0=4", "5"],
                        ["gamma", "3600", "1", "1x1 0.0=5", "0"]]):
        return 1
    print("ok  rated_quantities.sql")

    # Rated snapshots of customer beta: October (final snapshot at 11-01
    # 00:00, one earlier) and November (hours 10-12 under checksum c1, a
    # re-rating c2 of hours 9-10). Another customer's snapshot is never read.
    november = DAY
    snapshots = [
        rated("beta", OCTOBER, november - 3600, "c1", 0, "usage", "vcpu", "5", november + 60),
        rated("beta", OCTOBER, november - 3600, "c1", 1, "usage", "memory", "2", november + 60),
        rated("beta", OCTOBER, november, "c1", 0, "usage", "vcpu", "6", november + 300),
        rated("beta", OCTOBER, november, "c1", 1, "usage", "memory", "2.5", november + 300),
        rated("beta", OCTOBER, november, "c1", 2, "usage", "vcpu", "4", november + 302),
        rated("beta", OCTOBER, november, "c1", 3, "fee", "platform", "20", november + 301),
        rated("beta", november, HOUR_10, "c1", 0, "usage", "vcpu", "1", HOUR_10 + 120),
        rated("beta", november, HOUR_10, "c1", 1, "usage", "memory", "0.25", HOUR_10 + 120),
        rated("beta", november, HOUR_11, "c1", 0, "usage", "vcpu", "1.5", HOUR_11 + 120),
        rated("beta", november, HOUR_11, "c1", 1, "usage", "memory", "0.4", HOUR_11 + 120),
        rated("beta", november, HOUR_12, "c1", 0, "usage", "vcpu", "2", HOUR_12 + 120),
        rated("beta", november, HOUR_12, "c1", 1, "usage", "memory", "0.5", HOUR_12 + 120),
        rated("beta", november, HOUR_10 - 3600, "c2", 0, "usage", "vcpu", "0.9", HOUR_11 + 900),
        rated("beta", november, HOUR_10 - 3600, "c2", 1, "usage", "memory", "0.2", HOUR_11 + 900),
        rated("beta", november, HOUR_10, "c2", 0, "usage", "vcpu", "1.1", HOUR_11 + 900),
        rated("beta", november, HOUR_10, "c2", 1, "usage", "memory", "0.3", HOUR_11 + 900),
        rated("gamma", november, HOUR_11, "c1", 0, "usage", "vcpu", "7", HOUR_11 + 120),
    ]
    query(f"INSERT INTO rated_usage VALUES {', '.join(snapshots)}")
    # A re-run rewrites hour 11's vcpu line of c1 (the later rated_at wins).
    query(f"INSERT INTO rated_usage VALUES {rated('beta', november, HOUR_11, 'c1', 0, 'usage', 'vcpu', '1.6', HOUR_11 + 600)}")
    name = "snapshot_lines.sql"
    # Windows of (10:00, 11:00]: c1's 11:00 snapshot; as starting points the
    # latest snapshot at or before 10:00 of (October, c1) = 11-01 00:00 (two
    # vcpu lines, 6 + 4, the later rated at +302) and (November, c1) = 10:00.
    # c2 is left out: c1 was rated later in November (12:02 > 11:15).
    # Columns: period_start, checksum, as_of, currency, kind, resource, amount, rated_at.
    expected = [
        [str(OCTOBER), "c1", str(november), "USD", "fee", "platform", "20", str(november + 301)],
        [str(OCTOBER), "c1", str(november), "USD", "usage", "memory", "2.5", str(november + 300)],
        [str(OCTOBER), "c1", str(november), "USD", "usage", "vcpu", "10", str(november + 302)],
        [str(november), "c1", str(HOUR_10), "USD", "usage", "memory", "0.25", str(HOUR_10 + 120)],
        [str(november), "c1", str(HOUR_10), "USD", "usage", "vcpu", "1", str(HOUR_10 + 120)],
        [str(november), "c1", str(HOUR_11), "USD", "usage", "memory", "0.4", str(HOUR_11 + 120)],
        [str(november), "c1", str(HOUR_11), "USD", "usage", "vcpu", "1.6", str(HOUR_11 + 600)],
    ]
    params = ("beta", HOUR_11, "beta", HOUR_11, HOUR_10, HOUR_11, "beta", HOUR_11, HOUR_10)
    if not check_query(name, "(10:00, 11:00]", params, expected):
        return 1
    october_rows = expected[:3]
    # Windows of (10-31 22:00, 10-31 23:00]: October's 23:00 snapshot only; no
    # snapshot at or before 22:00, and November had not started.
    start, end = november - 7200, november - 3600
    expected = [
        [str(OCTOBER), "c1", str(end), "USD", "usage", "memory", "2", str(november + 60)],
        [str(OCTOBER), "c1", str(end), "USD", "usage", "vcpu", "5", str(november + 60)],
    ]
    if not check_query(name, "(10-31 22:00, 23:00]", ("beta", end, "beta", end, start, end, "beta", end, start), expected):
        return 1
    # A re-rating c3 of November, rated after every c1 row, supersedes c1 for
    # the whole period: only its 10:00 snapshot is a starting point now.
    query(f"INSERT INTO rated_usage VALUES {rated('beta', november, HOUR_10, 'c3', 0, 'usage', 'vcpu', '3', HOUR_12 + 999)}")
    expected = october_rows + [[str(november), "c3", str(HOUR_10), "USD", "usage", "vcpu", "3", str(HOUR_12 + 999)]]
    if not check_query(name, "(10:00, 11:00] after a re-rating", params, expected):
        return 1
    print(f"ok  {name}")

    decision = (
        "('acme:s:1:idle_window:1000', 'acme', 's', 'n', 1, 1000, 0, 'idle_window', 'suspend', 1, "
        "'p/1', 'idle', '{}', 1)"
    )
    query(f"INSERT INTO policy_decisions VALUES {decision}")
    query(f"INSERT INTO policy_decisions VALUES {decision}")  # a replayed decision
    rows = query(
        "SELECT decision_id FROM policy_decisions FINAL WHERE customer = 'acme' ORDER BY at_ms, decision_id"
    ).strip()
    if rows != '"acme:s:1:idle_window:1000"':
        print(f"FAIL policy_decisions replay did not collapse: {rows}")
        return 1
    query("INSERT INTO policy_state VALUES ('g', 'acme', 's', 1, '{\"seq\":1}')")
    query("INSERT INTO policy_state VALUES ('g', 'acme', 's', 2, '{\"seq\":2}')")
    state = query(
        "SELECT state FROM policy_state FINAL WHERE group_id = 'g' AND snapshot_ms >= 0 ORDER BY customer, sandbox"
    ).strip()
    if state != '"{""seq"":2}"':
        print(f"FAIL policy_state keeps the latest snapshot: {state}")
        return 1
    print("ok  policy tables")
    # Invoices: a crashed run's longer line set is replaced line by line
    # and cut at the header's line_count.
    query(
        "INSERT INTO invoice_lines VALUES ('i', 1, 1, 'acme', 'usage', 'vcpu', '1', 'h', '1', '9', 0, '', 1), "
        "('i', 1, 2, 'acme', 'usage', 'mem', '1', 'h', '1', '9', 0, '', 1)"
    )
    query("INSERT INTO invoice_lines VALUES ('i', 1, 1, 'acme', 'usage', 'vcpu', '1', 'h', '1', '5', 0, '', 2)")
    query(
        "INSERT INTO invoices VALUES ('i', 1, 'acme', 0, 2678400, 'USD', '', 's', 'c', "
        "'5', '0', '0', '0', '0', '0', '0', '5', '-1', 1, '0', 1, '0', '0', '')"
    )
    last = query("SELECT max(number) FROM invoices WHERE issuer = 'i'").strip()
    lines = query(
        "SELECT line_no, amount FROM invoice_lines FINAL WHERE issuer = 'i' AND number = 1 "
        "AND customer = 'acme' AND line_no <= 1 ORDER BY line_no"
    ).strip()
    if last != "1" or lines not in ("1,5", "1,5.000000000000"):
        print(f"FAIL invoices: last number {last}, lines {lines}")
        return 1
    query("INSERT INTO wallet_deposits VALUES ('i', 'acme', 'd1', '100', 10), ('i', 'acme', 'd2', '5', 99999)")
    query("INSERT INTO wallet_deposits VALUES ('i', 'acme', 'd1', '100', 10)")  # recorded twice
    wallet = query(
        "SELECT customer, sum(amount) FROM wallet_deposits FINAL WHERE issuer = 'i' AND customer >= 'a' "
        "AND customer <= 'z' AND deposited_at < toDateTime(1000) GROUP BY customer ORDER BY customer"
    ).strip()
    if wallet not in ('"acme",100', '"acme",100.000000000000'):
        print(f"FAIL wallet deposits: {wallet}")
        return 1
    # Credit notes settled to the next invoice, issued before the instant,
    # summed per customer (Store::credit_note_balances); a wallet note and a
    # later one are not.
    query(
        "INSERT INTO credit_notes VALUES ('i', 1, 'acme', 1, 0, 'USD', '25', '5', '30', "
        "'next_invoice', 'outage', 1, 10), ('i', 2, 'acme', 1, 0, 'USD', '1', '0', '1', "
        "'wallet', 'w', 1, 10), ('i', 3, 'acme', 1, 0, 'USD', '2', '0', '2', "
        "'next_invoice', 'late', 1, 99999)"
    )
    query("INSERT INTO credit_note_lines VALUES ('i', 1, 1, 'acme', 1, 1, 'vcpu', '25')")
    balance = query(
        "SELECT customer, sum(total) FROM credit_notes FINAL WHERE issuer = 'i' AND customer >= 'a' "
        "AND customer <= 'z' AND settlement = 'next_invoice' AND issued_at < toDateTime(1000) "
        "GROUP BY customer ORDER BY customer"
    ).strip()
    if balance not in ('"acme",30', '"acme",30.000000000000'):
        print(f"FAIL credit note balances: {balance}")
        return 1
    print("ok  invoice tables")
    final = query("SELECT count() FROM usage_samples FINAL").strip()
    if final != "8":
        print(f"FAIL duplicates did not collapse under FINAL: {final}")
        return 1
    print("ok  ReplacingMergeTree collapses the replay")

    # Sandbox state: the latest sample per sandbox. globex's sbx-c changes
    # node, epoch, state and shape; its latest sample is inserted first, and
    # everything is inserted twice (the query reads without FINAL).
    latest = sample("globex", "sbx-c", "node-2", 2, 2, HOUR_10 + 180, 40, state="suspended", vcpu_milli=4000,
                    mem_bytes=1073741824, gpu_model="h100", gpu_count=1, disk_bytes=5368709120,
                    exec_sessions=2, open_conns=3)
    earlier = ",".join([
        sample("globex", "sbx-c", "node-1", 1, 1, HOUR_10, 10),
        sample("globex", "sbx-c", "node-1", 1, 2, HOUR_10 + 60, 20, state="stopped"),
        sample("globex", "sbx-c", "node-2", 2, 1, HOUR_10 + 120, 30, vcpu_milli=4000),
    ])
    for _ in range(2):
        query(f"INSERT INTO usage_samples {SAMPLE_COLUMNS} VALUES {latest}")
        query(f"INSERT INTO usage_samples {SAMPLE_COLUMNS} VALUES {earlier}")
    name = "sandbox_state.sql"
    # Columns: sandbox, node, epoch, state, first_seen_ms, last_seen_ms,
    # vcpu_milli, mem_bytes, gpu_model, gpu_count, disk_bytes, exec_sessions, open_conns.
    a = ["sbx-a", "node-1", "1", "running", str((HOUR_10 + 3598) * 1000), str((HOUR_10 + 3601) * 1000),
         "2000", "0", "", "0", "0", "1", "0"]
    b = ["sbx-b", "node-1", "2", "running", str((HOUR_10 + 1800) * 1000), str((HOUR_10 + 1980) * 1000),
         "2000", "0", "", "0", "0", "1", "0"]
    c = ["sbx-c", "node-2", "2", "suspended", str(HOUR_10 * 1000), str((HOUR_10 + 180) * 1000),
         "4000", "1073741824", "h100", "1", "5368709120", "2", "3"]
    cases = [
        ("every sandbox", ("acme", "", 0, "", 100), [a, b]),
        ("after the cursor sbx-a", ("acme", "sbx-a", 0, "", 100), [b]),
        ("limit 1", ("acme", "", 0, "", 1), [a]),
        ("only sbx-b", ("acme", "", 1, "sbx-b", 100), [b]),
        ("only sbx-b, cursor at sbx-b", ("acme", "sbx-b", 1, "sbx-b", 100), []),
        ("only another customer's sandbox", ("acme", "", 1, "sbx-c", 100), []),
        ("latest sample wins", ("globex", "", 0, "", 100), [c]),
    ]
    for label, params, expected in cases:
        if not check_query(name, label, params, expected):
            return 1
    print(f"ok  {name}")
    return check_meter_windows(query)


def check_meter_windows(query) -> int:
    """meter_windows.sql filled as Store::query_meter fills it, for every
    aggregation, one window or hourly windows, with and without groups, over
    events of which one is stored twice (a replay)."""
    template = (QUERIES / "meter_windows.sql").read_text()
    start, day = 1672531200000, 86400000
    rows = [
        # customer, meter, subject, source, id, time_ms, value (x 10^12), text, model, received_ms
        ("c1", "tokens", "c1", "app", "1", start + 1, 123456, "123456", "gpt4", 1),
        ("c1", "tokens", "c1", "app", "1", start + 1, 123456, "123456", "gpt4", 2),
        ("c1", "tokens", "c1/u9", "app", "2", start + 3600000, 1000, "1000", "gpt3", 1),
        ("c1", "tokens", "c1", "app", "3", start + 3700000, 500, "500", "gpt4", 1),
        ("c2", "tokens", "c2", "app", "1", start + 1, 7, "7", "gpt4", 1),
    ]
    values = ",".join(
        f"('{c}','{m}','{s}','{src}','{i}',{t},toDecimal128({v}, 12),'{text}',['model'],['{model}'],{r})"
        for c, m, s, src, i, t, v, text, model, r in rows
    )
    query(f"INSERT INTO meter_values VALUES {values}")
    aggregates = {
        "sum": ("toString(sum(value))", ["123456", "1500"], "124956"),
        "count": ("toString(count())", ["1", "2"], "3"),
        "max": ("toString(max(value))", ["123456", "1000"], "123456"),
        "unique": ("toString(uniqExact(value_text))", ["1", "2"], "3"),
        "latest": ("toString(argMax(value, time_ms))", ["123456", "500"], "500"),
    }
    for label, (aggregate, hourly, total) in aggregates.items():
        one = (template.replace("{window}", "toUInt64(?)").replace("{subject}", "''")
               .replace("{groups}", "emptyArrayString()").replace("{aggregate}", aggregate)
               .replace("{filter}", ""))
        got = parse(query(bind(one, (start, "c1", "tokens", start, start + day))))
        if [[cell for cell in row[3:]] for row in got] != [[total]]:
            print(f"FAIL meter_windows.sql ({label}, one window): {got}")
            return 1
        hours = (template.replace("{window}", "intDiv(time_ms - ?, ?) * ? + ?").replace("{subject}", "''")
                 .replace("{groups}", "emptyArrayString()").replace("{aggregate}", aggregate)
                 .replace("{filter}", ""))
        got = parse(query(bind(hours, (start, 3600000, 3600000, start, "c1", "tokens", start, start + day))))
        if [row[3] for row in got] != hourly or [row[0] for row in got] != [str(start), str(start + 3600000)]:
            print(f"FAIL meter_windows.sql ({label}, hourly): {got}")
            return 1
    grouped = (template.replace("{window}", "toUInt64(?)").replace("{subject}", "subject")
               .replace("{groups}", "[group_values[indexOf(group_keys, ?)]]")
               .replace("{aggregate}", "toString(sum(value))").replace("{filter}", " AND subject = ?"))
    got = parse(query(bind(grouped, (start, "model", "c1", "tokens", start, start + day, "c1"))))
    if [row[1:] for row in got] != [["c1", "['gpt4']", "123956"]]:
        print(f"FAIL meter_windows.sql (by subject and model, one subject): {got}")
        return 1
    print("ok  meter_windows.sql")
    totals = (QUERIES / "meter_totals.sql").read_text()
    cases = [
        ("sum, every customer", "toString(sum(value))", ("a", "z"), [["c1", "124956"], ["c2", "7"]]),
        ("count, one customer", "toString(count())", ("c2", "c2"), [["c2", "1"]]),
        ("latest, every customer", "toString(argMax(value, time_ms))", ("a", "z"), [["c1", "500"], ["c2", "7"]]),
    ]
    for label, aggregate, (first, last), expected in cases:
        sql = totals.replace("{aggregate}", aggregate)
        got = parse(query(bind(sql, (first, last, "tokens", start, start + day))))
        if [[row[0], format(decimal.Decimal(row[1]).normalize(), "f")] for row in got] != expected:
            print(f"FAIL meter_totals.sql ({label}): {got}")
            return 1
    print("ok  meter_totals.sql")
    return 0


def main() -> int:
    from chdb import session

    with tempfile.TemporaryDirectory() as path:
        db = session.Session(path)
        db.query("CREATE DATABASE IF NOT EXISTS idlemeter")
        db.query("USE idlemeter")
        return run_checks(lambda sql: db.query(sql, "CSV").bytes().decode())


if __name__ == "__main__":
    sys.exit(main())
