//! Usage events as OpenMeter takes them (CloudEvents 1.0 in JSON) and meters
//! over them, defined as OpenMeter defines them.
//!
//! Platforms that meter something besides sandboxes (egress, snapshots,
//! model tokens) or that already send events to OpenMeter send them to
//! idlemeter's `POST /api/v1/events`. An event is identified by
//! `(source, id)`: storage collapses duplicates. A meter picks events by
//! `type`, reads a number with a JSON path (`valueProperty`) and groups by
//! other JSON paths (`groupBy`); its aggregation (SUM, COUNT, MAX,
//! UNIQUE_COUNT, LATEST) runs when it is read.
//!
//! Everything here is pure: parsing, validation and what a meter takes of an
//! event. The API validates with it before accepting an event, and ingest
//! derives the stored meter values with the same functions.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::CustomerId;

/// Decimal places a meter value keeps (ClickHouse `Decimal(38, 12)`).
pub const VALUE_SCALE: u32 = 12;

/// Longest `id`, `source`, `type` or `subject` accepted (bytes).
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

/// One usage event, validated. `time` is the event's own time, or the time
/// it was received when it had none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub customer: CustomerId,
    pub subject: String,
    pub source: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time_ms: i64,
    pub received_ms: i64,
    /// The `data` object (`null` when absent).
    pub data: Value,
}

/// Why one event of a request was refused: which event, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventError {
    /// Position in the batch (0 for a single event).
    pub index: usize,
    /// The event's `id`, when it had a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The field at fault, as a JSON pointer-like path (`time`, `data.tokens`).
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for EventError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "event {}", self.index)?;
        if let Some(id) = &self.id {
            write!(formatter, " (id {id:?})")?;
        }
        write!(formatter, ": field {:?}: {}", self.field, self.reason)
    }
}

/// How the request body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/cloudevents+json`: one event.
    Single,
    /// `application/cloudevents-batch+json`: an array of events.
    Batch,
    /// `application/json`: either.
    Either,
}

impl Framing {
    /// `None` for a content type OpenMeter does not take.
    pub fn of_content_type(content_type: &str) -> Option<Self> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/cloudevents+json" => Some(Self::Single),
            "application/cloudevents-batch+json" => Some(Self::Batch),
            "application/json" => Some(Self::Either),
            _ => None,
        }
    }
}

/// What a request's body held: the valid events and, for each refused one,
/// why. A body that is not JSON at all, or not framed as its content type
/// says, is one error at index 0 with field `""`.
#[derive(Debug, Default)]
pub struct ParsedEvents {
    pub events: Vec<UsageEvent>,
    pub errors: Vec<EventError>,
    /// Events in the body, valid or not.
    pub received: usize,
}

/// Parses and validates a request body. `customer_of` maps a subject to the
/// customer it bills (None: refused, e.g. another tenant's subject);
/// `meters` are checked against each event of their type, so an event a
/// meter cannot read is refused now rather than lost later.
pub fn parse_events(
    body: &[u8],
    framing: Framing,
    received: DateTime<Utc>,
    customer_of: &dyn Fn(&str) -> Result<CustomerId, String>,
    meters: &[Meter],
) -> ParsedEvents {
    let whole = |reason: String| ParsedEvents {
        errors: vec![EventError {
            index: 0,
            id: None,
            field: String::new(),
            reason,
        }],
        ..ParsedEvents::default()
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => return whole(format!("the body is not JSON: {error}")),
    };
    let items = match (value, framing) {
        (Value::Array(items), Framing::Batch | Framing::Either) => items,
        (object @ Value::Object(_), Framing::Single | Framing::Either) => vec![object],
        (Value::Array(_), Framing::Single) => {
            return whole(
                "application/cloudevents+json takes one event; send a batch as application/cloudevents-batch+json".to_owned(),
            )
        }
        (_, Framing::Batch) => {
            return whole("application/cloudevents-batch+json takes a JSON array of events".to_owned())
        }
        (_, _) => return whole("an event is a JSON object".to_owned()),
    };
    let mut parsed = ParsedEvents {
        received: items.len(),
        ..ParsedEvents::default()
    };
    for (index, item) in items.into_iter().enumerate() {
        match validate(index, item, received, customer_of, meters) {
            Ok(event) => parsed.events.push(event),
            Err(error) => parsed.errors.push(error),
        }
    }
    parsed
}

fn validate(
    index: usize,
    item: Value,
    received: DateTime<Utc>,
    customer_of: &dyn Fn(&str) -> Result<CustomerId, String>,
    meters: &[Meter],
) -> Result<UsageEvent, EventError> {
    let Value::Object(mut object) = item else {
        return Err(EventError {
            index,
            id: None,
            field: String::new(),
            reason: "an event is a JSON object".to_owned(),
        });
    };
    let id = object.get("id").and_then(Value::as_str).map(str::to_owned);
    let error = |field: &str, reason: String| EventError {
        index,
        id: id.clone().filter(|id| !id.is_empty()),
        field: field.to_owned(),
        reason,
    };
    let attribute = |name: &str| -> Result<String, EventError> {
        match object.get(name) {
            Some(Value::String(text)) if text.is_empty() => {
                Err(error(name, "must not be empty".to_owned()))
            }
            Some(Value::String(text)) if text.len() > MAX_ATTRIBUTE_BYTES => Err(error(
                name,
                format!("longer than {MAX_ATTRIBUTE_BYTES} bytes"),
            )),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(other) => Err(error(name, format!("must be a string, not {other}"))),
            None => Err(error(name, "is required".to_owned())),
        }
    };
    let specversion = attribute("specversion")?;
    if specversion != "1.0" {
        return Err(error(
            "specversion",
            format!("{specversion:?} is not a CloudEvents version this takes (1.0)"),
        ));
    }
    let id = attribute("id")?;
    let source = attribute("source")?;
    let event_type = attribute("type")?;
    let subject = attribute("subject")?;
    let time_ms = match object.get("time") {
        None | Some(Value::Null) => received.timestamp_millis(),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map_err(|parse| error("time", format!("{text:?} is not an RFC 3339 time: {parse}")))?
            .timestamp_millis(),
        Some(other) => {
            return Err(error(
                "time",
                format!("must be an RFC 3339 string, not {other}"),
            ))
        }
    };
    if let Some(content_type) = object.get("datacontenttype") {
        let json = content_type.as_str().is_some_and(|text| {
            text.split(';').next().unwrap_or_default().trim() == "application/json"
        });
        if !json {
            return Err(error(
                "datacontenttype",
                format!("{content_type} is not application/json (the only data this takes)"),
            ));
        }
    }
    let data = match object.remove("data") {
        None | Some(Value::Null) => Value::Null,
        Some(object @ Value::Object(_)) => object,
        Some(other) => return Err(error("data", format!("must be a JSON object, not {other}"))),
    };
    let customer = customer_of(&subject).map_err(|reason| error("subject", reason))?;
    let event = UsageEvent {
        customer,
        subject,
        source,
        id,
        event_type,
        time_ms,
        received_ms: received.timestamp_millis(),
        data,
    };
    for meter in meters
        .iter()
        .filter(|meter| meter.event_type == event.event_type)
    {
        meter
            .value_of(&event)
            .map_err(|(field, reason)| error(&field, format!("meter {}: {reason}", meter.slug)))?;
    }
    Ok(event)
}

/// How a meter combines the values of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    Sum,
    Count,
    Max,
    UniqueCount,
    Latest,
}

/// A meter as OpenMeter defines one (its configuration keys, in TOML):
///
/// ```toml
/// [[meters]]
/// slug = "tokens_total"
/// eventType = "prompt"
/// aggregation = "SUM"
/// valueProperty = "$.tokens"
/// groupBy = { model = "$.model", type = "$.type" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Meter {
    pub slug: String,
    #[serde(default)]
    pub description: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Required for every aggregation but COUNT.
    #[serde(default)]
    pub value_property: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
}

/// What a meter takes of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterValue {
    /// The number read (1 for COUNT; 0 for UNIQUE_COUNT, which counts `text`).
    pub value: Decimal,
    /// The value as text (UNIQUE_COUNT counts distinct texts).
    pub text: String,
    /// Each group-by key with the text at its path ("" when absent).
    pub groups: Vec<(String, String)>,
}

/// The meters of a deployment, from a TOML file of `[[meters]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meters {
    #[serde(default)]
    pub meters: Vec<Meter>,
}

impl Meters {
    /// Parses and checks every meter; the error names the file, the meter
    /// and what is wrong.
    pub fn from_toml(text: &str, label: &str) -> Result<Self, String> {
        let meters: Meters =
            toml::from_str(text).map_err(|error| format!("meters {label}: {error}"))?;
        let mut seen = std::collections::BTreeSet::new();
        for meter in &meters.meters {
            meter
                .check()
                .map_err(|reason| format!("meters {label}: meter {:?}: {reason}", meter.slug))?;
            if !seen.insert(meter.slug.as_str()) {
                return Err(format!(
                    "meters {label}: meter {:?} is defined twice",
                    meter.slug
                ));
            }
        }
        Ok(meters)
    }

    pub fn get(&self, slug: &str) -> Option<&Meter> {
        self.meters.iter().find(|meter| meter.slug == slug)
    }
}

impl Meter {
    fn check(&self) -> Result<(), String> {
        let slug_ok = !self.slug.is_empty()
            && self.slug.len() <= 64
            && self.slug.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-'
            });
        if !slug_ok {
            return Err("slug must be 1-64 of a-z, 0-9, '_' and '-'".to_owned());
        }
        if self.event_type.is_empty() {
            return Err("eventType must not be empty".to_owned());
        }
        match (&self.value_property, self.aggregation) {
            (None, Aggregation::Count) => {}
            (None, _) => {
                return Err("valueProperty is required unless the aggregation is COUNT".to_owned())
            }
            (Some(path), _) => {
                JsonPath::parse(path)
                    .map_err(|reason| format!("valueProperty {path:?}: {reason}"))?;
            }
        }
        for (key, path) in &self.group_by {
            if key.is_empty() {
                return Err("a groupBy key must not be empty".to_owned());
            }
            JsonPath::parse(path)
                .map_err(|reason| format!("groupBy {key:?} {path:?}: {reason}"))?;
        }
        Ok(())
    }

    /// What this meter takes of `event` (of its type), or the field it
    /// cannot read and why.
    pub fn value_of(&self, event: &UsageEvent) -> Result<MeterValue, (String, String)> {
        let read = |path: &str| -> Result<Option<&Value>, (String, String)> {
            let parsed = JsonPath::parse(path).map_err(|reason| (path.to_owned(), reason))?;
            Ok(parsed.find(&event.data))
        };
        let (value, text) = match (&self.value_property, self.aggregation) {
            (None, _) | (Some(_), Aggregation::Count) => (Decimal::ONE, "1".to_owned()),
            (Some(path), aggregation) => {
                let field = JsonPath::field_name(path);
                let found = read(path)?.ok_or_else(|| (field.clone(), "is missing".to_owned()))?;
                let text = match found {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    other => {
                        return Err((field, format!("must be a number or a string, not {other}")))
                    }
                };
                if aggregation == Aggregation::UniqueCount {
                    (Decimal::ZERO, text)
                } else {
                    let value = Decimal::from_str(&text)
                        .or_else(|_| Decimal::from_scientific(&text))
                        .map_err(|_| (field.clone(), format!("{text:?} is not a decimal number")))?
                        .normalize();
                    if value.scale() > VALUE_SCALE || value.abs() >= Decimal::from(10u128.pow(26)) {
                        return Err((
                            field,
                            format!("{text} does not fit a meter value (below 10^26, at most {VALUE_SCALE} decimal places)"),
                        ));
                    }
                    (value, text)
                }
            }
        };
        let mut groups = Vec::with_capacity(self.group_by.len());
        for (key, path) in &self.group_by {
            let text = match read(path)? {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
            };
            groups.push((key.clone(), text));
        }
        Ok(MeterValue {
            value,
            text,
            groups,
        })
    }
}

/// The JSON paths OpenMeter's meters use: `$`, then `.name`, `['name']` and
/// `[index]` steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath(Vec<Step>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(path: &str) -> Result<Self, String> {
        let rest = path
            .strip_prefix('$')
            .ok_or_else(|| "a JSON path starts with '$'".to_owned())?;
        let mut steps = Vec::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '.' => {
                    let mut name = String::new();
                    while let Some((_, next)) = chars.peek() {
                        if *next == '.' || *next == '[' {
                            break;
                        }
                        name.push(*next);
                        chars.next();
                    }
                    if name.is_empty() {
                        return Err(format!("an empty name at {}", at + 1));
                    }
                    steps.push(Step::Key(name));
                }
                '[' => {
                    let close = rest[at..]
                        .find(']')
                        .ok_or_else(|| format!("'[' at {} is not closed", at + 1))?;
                    let inside = &rest[at + 1..at + close];
                    let quoted = inside
                        .strip_prefix('\'')
                        .and_then(|text| text.strip_suffix('\''))
                        .or_else(|| {
                            inside
                                .strip_prefix('"')
                                .and_then(|text| text.strip_suffix('"'))
                        });
                    match quoted {
                        Some(name) => steps.push(Step::Key(name.to_owned())),
                        None => steps.push(Step::Index(inside.parse().map_err(|_| {
                            format!("[{inside}] is neither an index nor a quoted name")
                        })?)),
                    }
                    while let Some((position, _)) = chars.peek() {
                        if *position > at + close {
                            break;
                        }
                        chars.next();
                    }
                }
                other => return Err(format!("unexpected {other:?} at {}", at + 1)),
            }
        }
        Ok(Self(steps))
    }

    /// The value at this path in `data`, if there is one.
    pub fn find<'a>(&self, data: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(data, |value, step| match step {
            Step::Key(name) => value.get(name),
            Step::Index(index) => value.get(index),
        })
    }

    /// How an error names the field at `path`: `data.tokens` for `$.tokens`.
    pub fn field_name(path: &str) -> String {
        match Self::parse(path) {
            Ok(parsed) => parsed
                .0
                .iter()
                .fold("data".to_owned(), |name, step| match step {
                    Step::Key(key) => format!("{name}.{key}"),
                    Step::Index(index) => format!("{name}[{index}]"),
                }),
            Err(_) => format!("data ({path})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer_is_subject(subject: &str) -> Result<CustomerId, String> {
        CustomerId::parse(subject).map_err(|error| error.to_string())
    }

    fn tokens() -> Meter {
        Meters::from_toml(
            r#"
[[meters]]
slug = "tokens_total"
eventType = "prompt"
aggregation = "SUM"
valueProperty = "$.tokens"
groupBy = { model = "$.model", type = "$['type']" }
"#,
            "test",
        )
        .expect("valid")
        .meters
        .remove(0)
    }

    fn parse(body: &str, framing: Framing) -> ParsedEvents {
        parse_events(
            body.as_bytes(),
            framing,
            DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                .expect("time")
                .with_timezone(&Utc),
            &customer_is_subject,
            &[tokens()],
        )
    }

    #[test]
    fn openmeters_example_event_is_taken_and_metered() {
        let parsed = parse(
            r#"{"specversion":"1.0","type":"prompt","id":"00001","time":"2023-01-01T00:00:00.001Z",
               "source":"chat-app","subject":"customer-1",
               "data":{"tokens":"123456","model":"gpt4-turbo","type":"input"}}"#,
            Framing::Single,
        );
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let event = &parsed.events[0];
        assert_eq!(event.time_ms, 1_672_531_200_001);
        let value = tokens().value_of(event).expect("metered");
        assert_eq!(value.value, Decimal::from(123_456));
        assert_eq!(
            value.groups,
            vec![
                ("model".to_owned(), "gpt4-turbo".to_owned()),
                ("type".to_owned(), "input".to_owned())
            ]
        );
    }

    #[test]
    fn a_batch_keeps_the_good_events_and_names_each_bad_field() {
        let parsed = parse(
            r#"[
              {"specversion":"1.0","type":"prompt","id":"a","source":"s","subject":"acme","data":{"tokens":5}},
              {"specversion":"1.0","type":"prompt","id":"b","source":"s","subject":"acme","time":"yesterday","data":{"tokens":5}},
              {"specversion":"1.0","type":"prompt","id":"c","source":"s","subject":"acme","data":{"tokens":"many"}},
              {"specversion":"1.0","type":"prompt","id":"d","source":"s","subject":"acme","data":{}},
              {"specversion":"0.3","type":"prompt","id":"e","source":"s","subject":"acme"},
              {"specversion":"1.0","type":"other","id":"f","source":"s","subject":"acme"},
              {"specversion":"1.0","type":"prompt","source":"s","subject":"acme"},
              {"specversion":"1.0","type":"other","id":"h","source":"s","subject":"Not A Customer"}
            ]"#,
            Framing::Batch,
        );
        let ids: Vec<&str> = parsed.events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "f"]);
        assert_eq!(parsed.received, 8);
        let fields: Vec<(usize, &str)> = parsed
            .errors
            .iter()
            .map(|e| (e.index, e.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                (1, "time"),
                (2, "data.tokens"),
                (3, "data.tokens"),
                (4, "specversion"),
                (6, "id"),
                (7, "subject")
            ]
        );
        assert_eq!(
            parsed.errors[1].to_string(),
            "event 2 (id \"c\"): field \"data.tokens\": meter tokens_total: \"many\" is not a decimal number"
        );
    }

    #[test]
    fn framing_follows_the_content_type() {
        let one = r#"{"specversion":"1.0","type":"x","id":"1","source":"s","subject":"acme"}"#;
        assert_eq!(parse(one, Framing::Single).events.len(), 1);
        assert_eq!(parse(one, Framing::Either).events.len(), 1);
        assert_eq!(parse(one, Framing::Batch).errors[0].field, "");
        assert_eq!(parse(&format!("[{one}]"), Framing::Single).errors.len(), 1);
        assert_eq!(parse("{not json", Framing::Either).errors.len(), 1);
        assert_eq!(
            Framing::of_content_type("application/cloudevents-batch+json; charset=utf-8"),
            Some(Framing::Batch)
        );
        assert_eq!(Framing::of_content_type("text/plain"), None);
    }

    #[test]
    fn meters_are_checked_when_loaded() {
        let refused = |text: &str| Meters::from_toml(text, "m.toml").expect_err("refused");
        assert!(refused(
            "[[meters]]\nslug = \"Bad Slug\"\neventType = \"x\"\naggregation = \"COUNT\"\n"
        )
        .contains("slug"));
        assert!(
            refused("[[meters]]\nslug = \"a\"\neventType = \"x\"\naggregation = \"SUM\"\n")
                .contains("valueProperty is required")
        );
        assert!(refused(
            "[[meters]]\nslug = \"a\"\neventType = \"x\"\naggregation = \"MAX\"\nvalueProperty = \"tokens\"\n"
        )
        .contains("starts with '$'"));
        assert!(refused(
            "[[meters]]\nslug = \"a\"\neventType = \"x\"\naggregation = \"AVERAGE\"\n"
        )
        .contains("AVERAGE"));
        let twice = "[[meters]]\nslug = \"a\"\neventType = \"x\"\naggregation = \"COUNT\"\n";
        assert!(refused(&format!("{twice}{twice}")).contains("twice"));
    }

    #[test]
    fn json_paths_read_names_quoted_names_and_indexes() {
        let data: Value = serde_json::json!({"a": {"b c": [10, {"d": 7}]}});
        let at = |path: &str| JsonPath::parse(path).expect("parses").find(&data).cloned();
        assert_eq!(at("$.a['b c'][1].d"), Some(Value::from(7)));
        assert_eq!(at("$.a[\"b c\"][0]"), Some(Value::from(10)));
        assert_eq!(at("$.a.missing"), None);
        assert_eq!(at("$"), Some(data.clone()));
        assert!(JsonPath::parse("$.a[").is_err());
        assert!(JsonPath::parse("$..a").is_err());
        assert_eq!(JsonPath::field_name("$.a['b c'][1]"), "data.a.b c[1]");
    }
}
