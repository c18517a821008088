"""Writes dashboards/operations.json (the Grafana dashboard over the services'
Prometheus metrics) from the panel list below. Run it after editing a panel;
tests/tests/operations.rs checks every query against what the services expose.
"""
import json
import pathlib
panels_spec = [
 ("Readiness by service (1 = every check passes)", "timeseries", [("min by (job) (idlemeter_ready)", "{{job}}"), ("min by (job) (up{job=~\"idlemeter.*\"})", "{{job}} scraped")]),
 ("Failing readiness checks", "table", [("idlemeter_readiness_check == 0", "{{job}} {{check}}")]),
 ("Consumer lag (messages)", "timeseries", [("sum by (job) (idlemeter_ingest_lag_messages)", "ingest {{job}}"), ("sum by (job) (idlemeter_policy_lag_messages)", "policy {{job}}")]),
 ("Ingest throughput (samples/s)", "timeseries", [("sum by (job) (rate(idlemeter_ingest_samples_consumed_total[1m]))", "consumed"), ("sum by (job) (rate(idlemeter_ingest_samples_inserted_total[1m]))", "stored"), ("sum by (job) (rate(idlemeter_ingest_minutes_inserted_total[1m]))", "minute rows")]),
 ("Sample produced -> stored, p50 / p99 (s)", "timeseries", [("histogram_quantile(0.5, sum by (le) (rate(idlemeter_ingest_end_to_end_seconds_bucket[5m])))", "p50"), ("histogram_quantile(0.99, sum by (le) (rate(idlemeter_ingest_end_to_end_seconds_bucket[5m])))", "p99"), ("histogram_quantile(0.99, sum by (le) (rate(idlemeter_ingest_insert_seconds_bucket[5m])))", "ClickHouse insert p99")]),
 ("Dead letters and refusals (/s)", "timeseries", [("sum(rate(idlemeter_ingest_dead_letters_total[5m]))", "messages dead-lettered"), ("sum(rate(idlemeter_ingest_rows_dead_lettered_total[5m]))", "rows dead-lettered"), ("sum(rate(idlemeter_ingest_dead_letters_dropped_total[5m]))", "dead letters refused by the broker"), ("sum(rate(idlemeter_ingest_samples_rejected_total[5m]))", "samples refused"), ("sum(rate(idlemeter_policy_messages_refused_total[5m]))", "policy: messages refused")]),
 ("Usage events (/s)", "timeseries", [("sum(rate(idlemeter_ingest_events_consumed_total[5m]))", "consumed"), ("sum(rate(idlemeter_ingest_events_stored_total[5m]))", "stored"), ("sum(rate(idlemeter_ingest_meter_values_stored_total[5m]))", "meter values"), ("sum(rate(idlemeter_ingest_event_dead_letters_total[5m]))", "dead-lettered"), ("sum(rate(idlemeter_ingest_event_insert_failures_total[5m]))", "insert failures"), ("sum by (status) (rate(idlemeter_api_requests_total{route=\"/api/v1/events\"}[5m]))", "API {{status}}")]),
 ("Metering gaps: samples missing per sample received", "timeseries", [("sum(rate(idlemeter_ingest_samples_missing_total[15m])) / sum(rate(idlemeter_ingest_samples_consumed_total[15m]))", "missing share"), ("sum(rate(idlemeter_ingest_compact_late_total[15m])) / sum(rate(idlemeter_ingest_samples_consumed_total[15m]))", "late share")]),
 ("Rating (/s)", "timeseries", [("sum(rate(idlemeter_rater_snapshots_written_total[15m]))", "snapshots"), ("sum(rate(idlemeter_rater_customer_failures_total[15m]))", "customer failures"), ("sum(rate(idlemeter_rater_samples_refused_total[15m]))", "samples refused"), ("sum(rate(idlemeter_rater_pass_failures_total[15m]))", "pass failures")]),
 ("Idle policy: commands sent (/s) and sandboxes tracked", "timeseries", [("sum(rate(idlemeter_policy_commands_sent_total[5m]))", "commands/s"), ("sum(rate(idlemeter_policy_stale_decisions_total[5m]))", "stale decisions/s"), ("sum(idlemeter_policy_sandboxes_tracked)", "sandboxes tracked")]),
 ("Idle policy: sample -> command, p99 (s)", "timeseries", [("histogram_quantile(0.99, sum by (le) (rate(idlemeter_policy_decision_delay_seconds_bucket[5m])))", "decision p99"), ("histogram_quantile(0.99, sum by (le) (rate(idlemeter_policy_consume_delay_seconds_bucket[5m])))", "consume p99")]),
 ("Usage API requests by status (/s)", "timeseries", [("sum by (status) (rate(idlemeter_api_requests_total[5m]))", "{{status}}"), ("sum(rate(idlemeter_api_connections_refused_total[5m]))", "connections refused")]),
 ("Usage API latency p99 by route (s)", "timeseries", [("histogram_quantile(0.99, sum by (route, le) (rate(idlemeter_api_request_seconds_bucket[5m])))", "{{route}}")]),
 ("Webhook failures (/s)", "timeseries", [("sum(rate(idlemeter_policy_webhook_failures_total[15m]))", "policy decisions (after retries)"), ("sum(rate(idlemeter_api_alert_delivery_failures_total[15m]))", "spend alerts (each try)"), ("sum(rate(idlemeter_api_alerts_fired_total[15m]))", "spend alerts delivered")]),
 ("Invoicing", "timeseries", [("time() - max(idlemeter_invoicer_last_success_timestamp_seconds)", "seconds since the last successful run"), ("min(idlemeter_invoicer_last_run_succeeded)", "last run succeeded"), ("sum(increase(idlemeter_invoicer_invoices_issued_total[1h]))", "invoices issued (1 h)"), ("sum(increase(idlemeter_invoicer_customers_failed_total[1h]))", "customers failed (1 h)"), ("sum by (outcome) (increase(idlemeter_invoicer_runs_total[1h]))", "runs {{outcome}} (1 h)")]),
 ("Collectors: spool and shipping", "timeseries", [("sum by (instance) (idlemeter_collector_spool_bytes)", "spool bytes {{instance}}"), ("sum(rate(idlemeter_collector_send_failures_total[5m]))", "send failures/s"), ("sum(increase(idlemeter_collector_spool_dropped_batches_total[1h]))", "batches dropped (1 h)"), ("sum(increase(idlemeter_collector_spool_boundaries_lost_total[1h]))", "boundaries lost (1 h)")]),
 ("Collectors: tick p99 (s) and sandboxes", "timeseries", [("histogram_quantile(0.99, sum by (le) (rate(idlemeter_collector_tick_seconds_bucket[5m])))", "tick p99"), ("sum(idlemeter_collector_sandboxes)", "sandboxes"), ("sum(rate(idlemeter_collector_tick_failures_total[5m]))", "tick failures/s")]),
]
ds = {"type": "prometheus", "uid": "${datasource}"}
panels = []
for i, (title, kind, targets) in enumerate(panels_spec):
    panels.append({
        "datasource": ds,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "id": i + 1,
        "options": {},
        "targets": [{"datasource": ds, "expr": expr, "legendFormat": legend, "refId": chr(65 + j)} for j, (expr, legend) in enumerate(targets)],
        "title": title,
        "type": kind,
    })
dash = {
    "description": "idlemeter's services as Prometheus scrapes them; every query is checked against the metrics the services expose (tests/tests/operations.rs).",
    "panels": panels,
    "refresh": "30s",
    "schemaVersion": 39,
    "tags": ["idlemeter", "operations"],
    "templating": {"list": [{"label": "Prometheus", "name": "datasource", "query": "prometheus", "type": "datasource"}]},
    "time": {"from": "now-6h", "to": "now"},
    "timezone": "utc",
    "title": "idlemeter operations",
    "uid": "idlemeter-operations",
}
open(pathlib.Path(__file__).resolve().parents[1] / 'dashboards' / 'operations.json', 'w').write(json.dumps(dash, indent=2, sort_keys=True) + "\n")
