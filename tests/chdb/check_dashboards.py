"""Runs every finance panel (dashboards/panels.toml) on a current ClickHouse
(chDB) over dashboards/fixture/fixture.sql and checks the answers against
dashboards/fixture/expected.json -- the same fixture and answers that
tests/tests/dashboards.rs checks on ClickHouse 18.16.

Usage: python check_dashboards.py   (needs chdb; `make chdb-venv`)
"""

import calendar
import datetime
import json
import pathlib
import sys
import tempfile
import tomllib

from chdb import session

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"


def statements(sql: str):
    text = "\n".join(l for l in sql.splitlines() if not l.lstrip().startswith("--"))
    for statement in text.split(";\n"):
        statement = statement.strip().rstrip(";").strip()
        if statement:
            yield statement


def same(got: str, want: str) -> bool:
    if got == want:
        return True
    try:
        g, w = float(got), float(want)
    except ValueError:
        return False
    return abs(g - w) <= 1e-9 * max(1.0, abs(w))


def unix(text: str) -> int:
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return calendar.timegm(moment.timetuple())


def main() -> int:
    expected = json.loads((DASHBOARDS / "fixture" / "expected.json").read_text())
    panels = tomllib.loads((DASHBOARDS / "panels.toml").read_text())["panels"]
    def fragment(name):
        return "\n".join(
            l for l in (DASHBOARDS / "queries" / f"{name}.sql").read_text().splitlines()
            if not l.lstrip().startswith("--")
        )
    start, end = unix(expected["from"]), unix(expected["to"])
    with tempfile.TemporaryDirectory() as path:
        db = session.Session(path)
        db.query("CREATE DATABASE IF NOT EXISTS idlemeter")
        db.query("USE idlemeter")
        for migration in sorted((ROOT / "migrations").glob("*.sql")):
            for statement in statements(migration.read_text()):
                db.query(statement)
        for statement in statements((DASHBOARDS / "fixture" / "fixture.sql").read_text()):
            db.query(statement)
        # The minute rows ingest would have written: migration 0010's backfill.
        backfill = [statement for statement in statements((ROOT / "migrations" / "0010_compacted.sql").read_text())
                    if statement.lstrip().startswith("INSERT INTO usage_minutes")]
        db.query(backfill[0])
        failed = 0
        for panel in panels:
            sql = (
                panel["sql"].replace("{sandbox_margin}", fragment("sandbox_margin"))
                .replace("{sandbox_costs}", fragment("sandbox_costs"))
                .replace("{revenue_lines}", fragment("revenue_lines"))
                .replace("{from}", str(start)).replace("{to}", str(end)).replace("{interval_s}", "1")
            )
            out = db.query(sql, "TabSeparated").bytes().decode()
            rows = [line.split("\t") for line in out.strip().splitlines()] if out.strip() else []
            want = expected["panels"][panel["id"]]
            ok = len(rows) == len(want) and all(
                len(r) == len(w) and all(same(g, x) for g, x in zip(r, w)) for r, w in zip(rows, want)
            )
            if ok:
                print(f"ok  panel {panel['id']}")
            else:
                failed += 1
                print(f"FAIL panel {panel['id']}\n got      {rows}\n expected {want}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
