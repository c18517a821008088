"""Runs every migration and every store query on a current ClickHouse (chDB).

ClickHouse 18.16, the server the integration tests start, is old; production
runs current releases. This script applies migrations/*.sql in order to an
embedded ClickHouse 26.x (PyPI `chdb`), loads a small known trace, runs each
query of services/store/src/queries/ with its `?` placeholders bound, and
checks the answers. Exit status 0 means both engines accept the same SQL.

Usage: python check_sql.py   (needs `pip install chdb`; `make chdb-venv` does it)
"""

import pathlib
import sys
import tempfile

from chdb import session

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((ROOT / "migrations").glob("*.sql"))
QUERIES = ROOT / "services" / "store" / "src" / "queries"

# 2026-11-01 10:00:00 UTC (1793527200) and the trace of tests/tests/end_to_end.rs.
HOUR_10 = 1793527200
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
    """Client-side `?` binding, as the clickhouse crate does it."""
    parts = sql.split("?")
    assert len(parts) == len(params) + 1, f"{len(parts) - 1} placeholders, {len(params)} params"
    out = parts[0]
    for value, rest in zip(params, parts[1:]):
        out += (f"'{value}'" if isinstance(value, str) else str(value)) + rest
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as path:
        db = session.Session(path)
        db.query("CREATE DATABASE IF NOT EXISTS idlemeter")
        db.query("USE idlemeter")
        for migration in MIGRATIONS:
            for statement in statements(migration.read_text()):
                db.query(statement)
            # Applying twice must be harmless (IF NOT EXISTS everywhere).
            for statement in statements(migration.read_text()):
                db.query(statement)
            print(f"ok  {migration.name}")

        rows = ",".join(
            f"('acme','{sbx}','node-1',{epoch},{seq},{ts},{ts * 1000},'running',2000,0,'',0,0,"
            f"{cpu},0,0,{seq * 2000000},0,0,0,0,0,0,1,0)"
            for sbx, epoch, seq, ts, cpu in TRACE
        )
        db.query(f"INSERT INTO usage_samples VALUES {rows}")
        db.query(f"INSERT INTO usage_samples VALUES {rows}")  # a replay

        sql = (QUERIES / "usage_hourly_window.sql").read_text()
        window = (HOUR_10, "acme", HOUR_10 + 7200, "acme", HOUR_10, HOUR_10 + 7200)
        result = db.query(bind(sql, window), "CSV").bytes().decode()
        got = [line.split(",")[:5] + [line.split(",")[12]] for line in result.strip().splitlines()]
        expected = [
            ['"sbx-a"', "1", str(HOUR_10), "2", "1000", "3000"],
            ['"sbx-a"', "1", str(HOUR_10 + 3600), "2", "6000", "10000"],
            ['"sbx-b"', "1", str(HOUR_10), "2", "500", "900"],
            ['"sbx-b"', "2", str(HOUR_10), "2", "100", "400"],
        ]
        if got != expected:
            print(f"FAIL usage_hourly_window.sql\n got      {got}\n expected {expected}")
            return 1
        print("ok  usage_hourly_window.sql")
        sql = (QUERIES / "samples_for_rating.sql").read_text()
        # sbx-a's samples closing in hour 11, plus its last sample of hour 10 as
        # baseline; sbx-b has nothing in hour 11, so none of its samples.
        h11, h12 = (HOUR_10 + 3600) * 1000, (HOUR_10 + 7200) * 1000
        params = ("acme", h11, h12, "acme", h11, "acme", h11, h12)
        result = db.query(bind(sql, params), "CSV").bytes().decode()
        got = [tuple(line.split(",")[1:5:3]) for line in result.strip().splitlines()]
        expected = [('"sbx-a"', "2"), ('"sbx-a"', "3"), ('"sbx-a"', "4")]
        if got != expected:
            print(f"FAIL samples_for_rating.sql\n got      {got}\n expected {expected}")
            return 1
        print("ok  samples_for_rating.sql")
        sql = (QUERIES / "samples_for_rating_range.sql").read_text()
        params = ("a", "z", h11, h12, "a", "z", h11, "a", "z", h11, h12)
        result = db.query(bind(sql, params), "CSV").bytes().decode()
        got = [tuple(line.split(",")[1:5:3]) for line in result.strip().splitlines()]
        if got != expected:
            print(f"FAIL samples_for_rating_range.sql\n got      {got}\n expected {expected}")
            return 1
        print("ok  samples_for_rating_range.sql")

        # Rated usage: Decimal(38, 12) money summed per checksum (no decimal GROUP BY key).
        db.query(
            "INSERT INTO rated_usage VALUES ('acme', 0, 3600, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', "
            "'1.5', '1500', 'vcpu-hour', '0.01667', '0.03', 1), ('acme', 0, 3600, 's', 'c1', 'p', 'USD', 1, "
            "'usage', 'memory', '', '2', '2', 'GB-hour', '0.00833', '0.02', 1)"
        )
        total = db.query(
            "SELECT sheet_checksum, sum(amount) AS total FROM rated_usage FINAL WHERE customer = 'acme' "
            "AND period_start = toDateTime(0) AND as_of = toDateTime(3600) GROUP BY sheet_checksum", "CSV"
        ).bytes().decode().strip()
        if total not in ('"c1",0.05', '"c1",0.050000000000'):
            print(f"FAIL rated_usage totals: {total}")
            return 1
        print("ok  rated_usage totals")
        # An older snapshot of the same period must not be what period_spend reads.
        db.query(
            "INSERT INTO rated_usage VALUES ('acme', 0, 1800, 's', 'c1', 'p', 'USD', 0, 'usage', 'vcpu', '', "
            "'1', '1', 'vcpu-hour', '9', '9', 1)"
        )
        sql = (QUERIES / "period_spend.sql").read_text()
        spend = db.query(bind(sql, ("acme", "acme")), "CSV").bytes().decode().strip()
        if spend not in ("3600,0.05", "3600,0.050000000000"):
            print(f"FAIL period_spend.sql: {spend}")
            return 1
        print("ok  period_spend.sql")
        decision = (
            "('acme:s:1:idle_window:1000', 'acme', 's', 'n', 1, 1000, 0, 'idle_window', 'suspend', 1, "
            "'p/1', 'idle', '{}', 1)"
        )
        db.query(f"INSERT INTO policy_decisions VALUES {decision}")
        db.query(f"INSERT INTO policy_decisions VALUES {decision}")  # a replayed decision
        rows = db.query(
            "SELECT decision_id FROM policy_decisions FINAL WHERE customer = 'acme' ORDER BY at_ms, decision_id",
            "CSV",
        ).bytes().decode().strip()
        if rows != '"acme:s:1:idle_window:1000"':
            print(f"FAIL policy_decisions replay did not collapse: {rows}")
            return 1
        db.query("INSERT INTO policy_state VALUES ('g', 'acme', 's', 1, '{\"seq\":1}')")
        db.query("INSERT INTO policy_state VALUES ('g', 'acme', 's', 2, '{\"seq\":2}')")
        state = db.query(
            "SELECT state FROM policy_state FINAL WHERE group_id = 'g' AND snapshot_ms >= 0 ORDER BY customer, sandbox",
            "CSV",
        ).bytes().decode().strip()
        if state != '"{""seq"":2}"':
            print(f"FAIL policy_state keeps the latest snapshot: {state}")
            return 1
        print("ok  policy tables")
        # Invoices: a crashed run's longer line set is replaced line by line
        # and cut at the header's line_count.
        db.query(
            "INSERT INTO invoice_lines VALUES ('i', 1, 1, 'acme', 'usage', 'vcpu', '1', 'h', '1', '9', 0, '', 1), "
            "('i', 1, 2, 'acme', 'usage', 'mem', '1', 'h', '1', '9', 0, '', 1)"
        )
        db.query("INSERT INTO invoice_lines VALUES ('i', 1, 1, 'acme', 'usage', 'vcpu', '1', 'h', '1', '5', 0, '', 2)")
        db.query(
            "INSERT INTO invoices VALUES ('i', 1, 'acme', 0, 2678400, 'USD', '', 's', 'c', "
            "'5', '0', '0', '0', '0', '0', '0', '5', '-1', 1, '0', 1)"
        )
        last = db.query("SELECT max(number) FROM invoices WHERE issuer = 'i'", "CSV").bytes().decode().strip()
        lines = db.query(
            "SELECT line_no, amount FROM invoice_lines FINAL WHERE issuer = 'i' AND number = 1 "
            "AND customer = 'acme' AND line_no <= 1 ORDER BY line_no",
            "CSV",
        ).bytes().decode().strip()
        if last != "1" or lines not in ("1,5", "1,5.000000000000"):
            print(f"FAIL invoices: last number {last}, lines {lines}")
            return 1
        db.query("INSERT INTO wallet_deposits VALUES ('i', 'acme', 'd1', '100', 10), ('i', 'acme', 'd2', '5', 99999)")
        db.query("INSERT INTO wallet_deposits VALUES ('i', 'acme', 'd1', '100', 10)")  # recorded twice
        wallet = db.query(
            "SELECT customer, sum(amount) FROM wallet_deposits FINAL WHERE issuer = 'i' AND customer >= 'a' "
            "AND customer <= 'z' AND deposited_at < toDateTime(1000) GROUP BY customer ORDER BY customer",
            "CSV",
        ).bytes().decode().strip()
        if wallet not in ('"acme",100', '"acme",100.000000000000'):
            print(f"FAIL wallet deposits: {wallet}")
            return 1
        print("ok  invoice tables")
        final = db.query("SELECT count() FROM usage_samples FINAL", "CSV").bytes().decode().strip()
        if final != "8":
            print(f"FAIL duplicates did not collapse under FINAL: {final}")
            return 1
        print("ok  ReplacingMergeTree collapses the replay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
