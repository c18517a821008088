//! The JSONL sample format of the offline rater: one JSON object per line.
//!
//! Fields: `ts` (RFC 3339, UTC), `customer`, `node`, `sandbox`, `epoch`, `seq`,
//! `state` (running | suspended | stopped), `vcpu` (a decimal number or
//! string), `mem_bytes`, `gpu_model` (string or null), `gpu_count`,
//! `disk_bytes`, `cpu_used_usec`, `mem_used_bytes`, `net_rx_bytes`,
//! `net_tx_bytes`, `exec_sessions`, `open_conns`. `gpu_model` and `gpu_count`
//! may be left out for a sandbox without GPU. The billed counters of
//! [`crate::Counter`] (`vcpu_alloc_usec`, `running_ms`, ...: cumulative since
//! the epoch's start) are optional: a line carries those it names, and rating
//! reads a counter where both samples of an interval carry it, the gauges
//! otherwise (see services/core/README.md). `api_calls` defaults to 0.
//! Unknown fields are refused, so a misspelt counter is never read as zero.
//!
//! Every field is parsed from its raw JSON text: `vcpu` never passes through a
//! binary float, integers must be plain non-negative JSON integers. A bad line
//! yields one [`LineError`] per bad field and the good lines are kept.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;

use crate::counters::{Counter, CounterSet, StateCounters};
use crate::error::LineError;
use crate::ids::{CustomerId, Epoch, NodeId, SandboxId};
use crate::rating::NumberedSample;
use crate::sample::{LifecycleState, SampleDetail, UsageSample, VcpuMillis};

/// Samples parsed from JSONL, and the lines refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedSamples {
    pub samples: Vec<NumberedSample>,
    pub errors: Vec<LineError>,
}

/// Parses every non-blank line of a JSONL text. Never fails as a whole.
pub fn parse_samples(text: &str) -> ParsedSamples {
    let mut parsed = ParsedSamples::default();
    let mut interner = IdInterner::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index as u64 + 1;
        match parse_sample(line) {
            Ok(sample) => parsed.samples.push(NumberedSample {
                line: line_number,
                sample: interner.intern(sample),
            }),
            Err(field_errors) => parsed.errors.extend(
                field_errors
                    .into_iter()
                    .map(|(field, reason)| LineError::new(line_number, field, reason)),
            ),
        }
    }
    parsed
}

/// Makes every sample of a customer, node or sandbox share one id allocation,
/// so that rating compares ids by pointer instead of by bytes.
#[derive(Debug, Default)]
struct IdInterner {
    customers: HashSet<CustomerId>,
    nodes: HashSet<NodeId>,
    sandboxes: HashSet<SandboxId>,
}

impl IdInterner {
    fn intern(&mut self, mut sample: UsageSample) -> UsageSample {
        sample.customer = shared(&mut self.customers, sample.customer);
        sample.node = shared(&mut self.nodes, sample.node);
        sample.sandbox = shared(&mut self.sandboxes, sample.sandbox);
        sample
    }
}

fn shared<T: Clone + Eq + std::hash::Hash>(seen: &mut HashSet<T>, id: T) -> T {
    match seen.get(&id) {
        Some(existing) => existing.clone(),
        None => {
            seen.insert(id.clone());
            id
        }
    }
}

/// A field name and why its value was refused.
type FieldError = (String, String);

/// Parses one line, collecting every bad field rather than stopping at the first.
pub fn parse_sample(line: &str) -> Result<UsageSample, Vec<FieldError>> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(line)
        .map_err(|error| vec![("json".to_owned(), format!("not a JSON object: {error}"))])?;
    let mut reader = FieldReader {
        fields: &fields,
        errors: Vec::new(),
    };
    let sample = reader.read_sample();
    reader.refuse_unknown_fields();
    match sample {
        Some(sample) if reader.errors.is_empty() => sample
            .validate()
            .map(|()| sample)
            .map_err(|error| vec![field_error_of(error)]),
        _ => Err(reader.errors),
    }
}

const KNOWN_FIELDS: &[&str] = &[
    "detail",
    "ts",
    "customer",
    "node",
    "sandbox",
    "epoch",
    "seq",
    "state",
    "vcpu",
    "mem_bytes",
    "gpu_model",
    "gpu_count",
    "disk_bytes",
    "cpu_used_usec",
    "mem_used_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
    "exec_sessions",
    "open_conns",
    "api_calls",
];

fn field_error_of(error: crate::sample::SampleError) -> FieldError {
    match error {
        crate::sample::SampleError::Field { field, reason } => (field.to_owned(), reason),
    }
}

/// Reads typed fields out of one line's raw values, recording what is wrong.
struct FieldReader<'a> {
    fields: &'a BTreeMap<String, &'a RawValue>,
    errors: Vec<FieldError>,
}

/// What a field may be when it is not there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Presence {
    Required,
    /// Absent (or null) means zero / none.
    Optional,
}

impl FieldReader<'_> {
    fn read_sample(&mut self) -> Option<UsageSample> {
        use Presence::{Optional, Required};
        // Every field is read before any is unwrapped, so all errors are seen.
        let ts = self.required("ts", parse_timestamp);
        let customer = self.required("customer", |raw| parse_id(raw, CustomerId::parse));
        let node = self.required("node", |raw| parse_id(raw, NodeId::parse));
        let sandbox = self.required("sandbox", |raw| parse_id(raw, SandboxId::parse));
        let epoch = self.integer("epoch", Required).map(Epoch);
        let seq = self.integer("seq", Required);
        let state = self.required("state", |raw| {
            LifecycleState::from_str(&json_string(raw)?).map_err(|error| field_error_of(error).1)
        });
        let vcpu = self.required("vcpu", parse_vcpu);
        let mem_bytes = self.integer("mem_bytes", Required);
        let gpu_model = self.optional("gpu_model", |raw| json_string(raw).map(Some));
        let gpu_count = self.integer("gpu_count", Optional);
        let disk_bytes = self.integer("disk_bytes", Required);
        let cpu_used_usec = self.integer("cpu_used_usec", Required);
        let mem_used_bytes = self.integer("mem_used_bytes", Required);
        let net_rx_bytes = self.integer("net_rx_bytes", Required);
        let net_tx_bytes = self.integer("net_tx_bytes", Required);
        let exec_sessions = self.integer("exec_sessions", Required);
        let open_conns = self.integer("open_conns", Required);
        let counters = self.counters();
        let api_calls = self.integer("api_calls", Optional);
        let detail = self.optional("detail", |raw| {
            serde_json::from_str::<SampleDetail>(raw).map_err(|error| {
                format!("is not a detail object of non-negative integers ({error})")
            })
        });
        Some(UsageSample {
            ts: ts?,
            customer: customer?,
            node: node?,
            sandbox: sandbox?,
            epoch: epoch?,
            seq: seq?,
            state: state?,
            vcpu: vcpu?,
            mem_bytes: mem_bytes?,
            gpu_model: gpu_model?,
            gpu_count: gpu_count?,
            disk_bytes: disk_bytes?,
            cpu_used_usec: cpu_used_usec?,
            mem_used_bytes: mem_used_bytes?,
            net_rx_bytes: net_rx_bytes?,
            net_tx_bytes: net_tx_bytes?,
            vcpu_alloc_usec: 0,
            mem_alloc_kib_ms: 0,
            mem_used_kib_ms: 0,
            gpu_alloc_ms: 0,
            disk_mib_ms: 0,
            api_calls: api_calls?,
            exec_sessions: exec_sessions?,
            open_conns: open_conns?,
            detail: detail?,
            state_counters: StateCounters::default(),
            counters_present: CounterSet::NONE,
        })
        .map(|mut sample| {
            for (counter, value) in counters {
                sample.set_counter(counter, value);
            }
            sample
        })
    }

    /// The billed counters the line carries (a present, non-null field), so
    /// that rating reads exactly those and derives the rest from the gauges.
    fn counters(&mut self) -> Vec<(Counter, u64)> {
        let mut carried = Vec::new();
        for counter in Counter::ALL {
            let name = counter.name();
            match self.fields.get(name).map(|raw| raw.get().trim()) {
                None | Some("null") => {}
                Some(_) => {
                    if let Some(value) = self.integer(name, Presence::Required) {
                        carried.push((counter, value));
                    }
                }
            }
        }
        carried
    }

    fn required<T>(
        &mut self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.read(field, parse, || Err("is missing".to_owned()))
    }

    /// An optional field absent or null is the type's default (zero, none).
    fn optional<T: Default>(
        &mut self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.read(field, parse, || Ok(T::default()))
    }

    /// Reads a field with `parse`, or `absent` when it is not there. Returns
    /// `None`, and records why, when the value is unusable.
    fn read<T>(
        &mut self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
        absent: impl FnOnce() -> Result<T, String>,
    ) -> Option<T> {
        let outcome = match self.fields.get(field).map(|raw| raw.get().trim()) {
            None => absent(),
            Some("null") => absent().map_err(|_| "is null".to_owned()),
            Some(raw) => parse(raw),
        };
        outcome
            .map_err(|reason| self.errors.push((field.to_owned(), reason)))
            .ok()
    }

    fn integer<T: FromStr + Default>(&mut self, field: &str, presence: Presence) -> Option<T> {
        let parse = |raw: &str| {
            raw.parse::<T>().map_err(|_| {
                format!("{raw} is not a non-negative integer in range (write counters as plain JSON integers)")
            })
        };
        match presence {
            Presence::Required => self.required(field, parse),
            Presence::Optional => self.optional(field, parse),
        }
    }

    fn refuse_unknown_fields(&mut self) {
        for name in self.fields.keys() {
            let counter = Counter::ALL.iter().any(|counter| counter.name() == name);
            if !counter && !KNOWN_FIELDS.contains(&name.as_str()) {
                self.errors
                    .push((name.clone(), "is not a sample field (misspelt?)".to_owned()));
            }
        }
    }
}

fn json_string(raw: &str) -> Result<String, String> {
    serde_json::from_str::<String>(raw).map_err(|_| format!("{raw} is not a JSON string"))
}

fn parse_id<T, E: std::fmt::Display>(
    raw: &str,
    parse: impl FnOnce(String) -> Result<T, E>,
) -> Result<T, String> {
    parse(json_string(raw)?).map_err(|error| error.to_string())
}

/// RFC 3339 with a zero UTC offset; sub-millisecond digits are truncated, as
/// samples carry millisecond precision.
fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, String> {
    let text = json_string(raw)?;
    let parsed = DateTime::parse_from_rfc3339(&text)
        .map_err(|error| format!("{text:?} is not an RFC 3339 timestamp: {error}"))?;
    if parsed.offset().local_minus_utc() != 0 {
        return Err(format!("{text:?} is not in UTC (use Z or +00:00)"));
    }
    let millis = parsed.timestamp_millis();
    DateTime::from_timestamp_millis(millis).ok_or_else(|| format!("{text:?} is out of range"))
}

/// A vCPU count from a JSON number token or string, exactly: the token's
/// digits go straight to a decimal, never through a binary float.
fn parse_vcpu(raw: &str) -> Result<VcpuMillis, String> {
    let text = if raw.starts_with('"') {
        json_string(raw)?
    } else {
        raw.to_owned()
    };
    let decimal = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str(&text)
    }
    .map_err(|_| format!("{text} is not a decimal number"))?;
    VcpuMillis::from_decimal(decimal).map_err(|error| field_error_of(error).1)
}

/// One sample as a JSONL line that [`parse_sample`] reads back equal: the
/// counters it carries, its detail when it has any. For exports (what-if on
/// stored samples, replay files).
pub fn to_line(sample: &UsageSample) -> String {
    let mut line = serde_json::Map::new();
    let mut put = |key: &str, value: serde_json::Value| {
        line.insert(key.to_owned(), value);
    };
    put(
        "ts",
        sample
            .ts
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into(),
    );
    put("customer", sample.customer.as_str().into());
    put("node", sample.node.as_str().into());
    put("sandbox", sample.sandbox.as_str().into());
    put("epoch", sample.epoch.0.into());
    put("seq", sample.seq.into());
    put("state", sample.state.as_str().into());
    put("vcpu", sample.vcpu.to_decimal().to_string().into());
    put("mem_bytes", sample.mem_bytes.into());
    put(
        "gpu_model",
        sample
            .gpu_model
            .clone()
            .map_or(serde_json::Value::Null, Into::into),
    );
    put("gpu_count", sample.gpu_count.into());
    put("disk_bytes", sample.disk_bytes.into());
    put("cpu_used_usec", sample.cpu_used_usec.into());
    put("mem_used_bytes", sample.mem_used_bytes.into());
    put("net_rx_bytes", sample.net_rx_bytes.into());
    put("net_tx_bytes", sample.net_tx_bytes.into());
    put("exec_sessions", sample.exec_sessions.into());
    put("open_conns", sample.open_conns.into());
    put("api_calls", sample.api_calls.into());
    for counter in Counter::ALL {
        if sample.counters_present.contains(counter) {
            put(counter.name(), sample.counter(counter).into());
        }
    }
    if sample.detail != SampleDetail::default() {
        put(
            "detail",
            serde_json::to_value(sample.detail).unwrap_or(serde_json::Value::Null),
        );
    }
    serde_json::Value::Object(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"ts":"2026-01-05T10:00:00Z","customer":"acme","node":"n1","sandbox":"s1","epoch":1,"seq":2,"state":"running","vcpu":0.125,"mem_bytes":1024,"gpu_model":null,"gpu_count":0,"disk_bytes":0,"cpu_used_usec":5,"mem_used_bytes":7,"net_rx_bytes":1,"net_tx_bytes":2,"exec_sessions":1,"open_conns":0}"#;

    #[test]
    fn an_exported_line_reads_back_equal() {
        let mut sample = parse_sample(GOOD).expect("good");
        assert_eq!(parse_sample(&to_line(&sample)).expect("exported"), sample);
        sample.set_counter(Counter::RunningMs, 1_000);
        sample.set_counter(Counter::SuspendedMs, 0);
        sample.set_counter(Counter::VcpuAllocUsec, 125_000);
        sample.gpu_model = Some("H100".to_owned());
        sample.gpu_count = 1;
        sample.api_calls = 9;
        sample.detail.mem_peak_bytes = 77;
        let line = to_line(&sample);
        assert_eq!(parse_sample(&line).expect("exported"), sample, "{line}");
    }

    #[test]
    fn a_good_line_parses_exactly() {
        let sample = parse_sample(GOOD).expect("good line");
        assert_eq!(sample.vcpu, VcpuMillis(125));
        assert_eq!(sample.seq, 2);
        assert_eq!(sample.vcpu_alloc_usec, 0);
        assert_eq!(sample.ts.to_rfc3339(), "2026-01-05T10:00:00+00:00");
    }

    #[test]
    fn detail_is_optional_and_strict_about_its_fields() {
        assert!(parse_sample(GOOD).expect("good line").detail.is_empty());
        let line = GOOD.replacen('{', r#"{"detail":{"gpu_busy_ms":5,"io_read_bytes":7},"#, 1);
        let sample = parse_sample(&line).expect("detail parses");
        assert_eq!(
            (sample.detail.gpu_busy_ms, sample.detail.io_read_bytes),
            (5, 7)
        );
        let line = GOOD.replacen('{', r#"{"detail":{"gpu_bsy_ms":5},"#, 1);
        let errors = parse_sample(&line).expect_err("misspelt detail field");
        assert_eq!(errors[0].0, "detail");
        assert!(errors[0].1.contains("gpu_bsy_ms"), "{errors:?}");
    }

    #[test]
    fn vcpu_is_read_from_its_text_not_a_float() {
        assert_eq!(parse_vcpu("\"1.5\""), Ok(VcpuMillis(1500)));
        assert_eq!(parse_vcpu("2"), Ok(VcpuMillis(2000)));
        assert_eq!(parse_vcpu("2.5e-1"), Ok(VcpuMillis(250)));
        // 0.1 + 0.2 as a float is 0.30000000000000004: the text must win.
        assert_eq!(parse_vcpu("0.300"), Ok(VcpuMillis(300)));
        assert!(parse_vcpu("0.0001").is_err());
        assert!(parse_vcpu("true").is_err());
    }

    #[test]
    fn every_bad_field_of_a_line_is_named() {
        let line = GOOD
            .replace("\"seq\":2", "\"seq\":-2")
            .replace("\"running\"", "\"paused\"")
            .replace("\"open_conns\":0", "\"open_conn\":0");
        let errors = parse_sample(&line).expect_err("bad line");
        let fields: Vec<&str> = errors.iter().map(|(field, _)| field.as_str()).collect();
        assert_eq!(fields, vec!["seq", "state", "open_conns", "open_conn"]);
    }

    #[test]
    fn non_utc_timestamps_and_fractional_counters_are_refused() {
        let line = GOOD.replace("10:00:00Z", "10:00:00+02:00");
        assert_eq!(parse_sample(&line).expect_err("offset")[0].0, "ts");
        let line = GOOD.replace("\"cpu_used_usec\":5", "\"cpu_used_usec\":5.0");
        assert_eq!(
            parse_sample(&line).expect_err("float")[0].0,
            "cpu_used_usec"
        );
    }

    #[test]
    fn bad_lines_are_reported_and_good_lines_kept() {
        let text = format!(
            "{GOOD}\nnot json\n\n{}\n",
            GOOD.replace("\"seq\":2", "\"seq\":3")
        );
        let parsed = parse_samples(&text);
        assert_eq!(parsed.samples.len(), 2);
        assert_eq!(parsed.samples[1].line, 4);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(
            (parsed.errors[0].line, parsed.errors[0].field.as_str()),
            (2, "json")
        );
    }
}
