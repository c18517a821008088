//! OpenMeter-compatible usage events: `POST /api/v1/events` takes CloudEvents
//! (one, or a batch) from ingest keys and publishes them to the events topic;
//! `GET /api/v1/meters` and `GET /api/v1/meters/{slug}/query` read meters
//! back with OpenMeter's aggregations and response shape.
//!
//! Accepting: every event of a request is validated (CloudEvents 1.0
//! attributes, the subject's tenant, and each meter of its type can read
//! it); the valid ones are published and acknowledged by Kafka before the
//! answer. All valid: 204. Some refused: 400 with a problem document that
//! names each refused event's index, id and field, and says how many were
//! accepted; a retry of the whole batch is safe, because storage collapses
//! events on (source, id).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use idlemeter_core::events::{parse_events, EventError, Framing, Meters};
use idlemeter_core::CustomerId;
use idlemeter_store::MeterQuery;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Principal, Scope};
use crate::problem::{Problem, PROBLEM_JSON};
use crate::AppState;

type AppStateRef = State<Arc<AppState>>;

/// Publishes accepted events (each with its Kafka key, the subject) and
/// resolves once the broker acknowledged every one.
pub type Publish =
    Arc<dyn Fn(Vec<(String, Vec<u8>)>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What the events endpoint needs: where to publish, the meters, limits.
#[derive(Clone)]
pub struct EventSink {
    pub publish: Publish,
    pub meters: Arc<Meters>,
    /// Events one request may carry.
    pub max_events: usize,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EventSink")
            .field("meters", &self.meters.meters.len())
            .field("max_events", &self.max_events)
            .finish()
    }
}

/// The customer a subject bills: the subject itself, or what precedes its
/// first '/' (`acme/sbx-1` meters below customer `acme`).
pub fn customer_of_subject(subject: &str) -> Result<CustomerId, String> {
    let customer = subject.split('/').next().unwrap_or_default();
    CustomerId::parse(customer).map_err(|error| {
        format!("{subject:?} does not name a customer (`<customer>` or `<customer>/<anything>`): {error}")
    })
}

/// A 400 answer to a batch with refused events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsProblem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Events of the request that were published (and will be stored).
    pub accepted: usize,
    /// Each refused event: its index in the request, its id, the field and why.
    #[schema(value_type = Vec<Object>)]
    pub errors: Vec<EventError>,
}

#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    summary = "Ingest usage events (CloudEvents, as OpenMeter's API takes them)",
    description = "One event as `application/cloudevents+json`, a batch as `application/cloudevents-batch+json`, or either as `application/json`. Needs an ingest key (or an admin key). Events are identified by (source, id): a retry is safe. 204: all accepted; 400: the refused ones are named, the others accepted.",
    request_body(content = Object, content_type = "application/cloudevents+json"),
    responses(
        (status = 204, description = "every event accepted"),
        (status = 400, body = EventsProblem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json"),
        crate::problem::AuthProblems))]
pub async fn ingest_events(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let tenant = match &principal.scope {
        Scope::Admin | Scope::Ingest(None) => None,
        Scope::Ingest(Some(customer)) => Some(customer.clone()),
        Scope::Customer(_) => {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a customer key reads usage; send events with an ingest key (`idlemeter keys create --ingest`)",
            ))
        }
    };
    let Some(sink) = state.events.clone() else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "this API does not take events (start it with a Kafka broker to publish to)",
        ));
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let Some(framing) = Framing::of_content_type(content_type) else {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!(
                "content type {content_type:?}: send application/cloudevents+json, application/cloudevents-batch+json or application/json"
            ),
        ));
    };
    let customer_of = |subject: &str| -> Result<CustomerId, String> {
        let customer = customer_of_subject(subject)?;
        match &tenant {
            Some(own) if *own != customer => Err(format!(
                "{subject:?} belongs to customer {:?}; this key sends events for {:?} only",
                customer.as_str(),
                own.as_str()
            )),
            _ => Ok(customer),
        }
    };
    let parsed = parse_events(
        &body,
        framing,
        state.now(),
        &customer_of,
        &sink.meters.meters,
    );
    if parsed.received > sink.max_events {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-many-events",
            format!(
                "{} events in one request; at most {} (split the batch)",
                parsed.received, sink.max_events
            ),
        ));
    }
    let accepted = parsed.events.len();
    if accepted > 0 {
        let messages = parsed
            .events
            .iter()
            .map(|event| {
                serde_json::to_vec(event)
                    .map(|payload| (event.subject.clone(), payload))
                    .map_err(Problem::internal)
            })
            .collect::<Result<Vec<_>, _>>()?;
        (sink.publish)(messages).await.map_err(|error| {
            tracing::warn!(%error, events = accepted, "publishing events failed");
            Problem::unavailable(
                "the events could not be published now; retry the request (duplicates collapse)",
            )
        })?;
    }
    if parsed.errors.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let detail = format!(
        "{} of {} events refused ({} accepted): {}",
        parsed.errors.len(),
        parsed.received,
        accepted,
        parsed
            .errors
            .iter()
            .take(3)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let problem = EventsProblem {
        kind: "urn:idlemeter:problem:invalid-events".to_owned(),
        title: "Bad Request".to_owned(),
        status: 400,
        detail,
        accepted,
        errors: parsed.errors,
    };
    let mut response = (
        StatusCode::BAD_REQUEST,
        serde_json::to_vec(&problem).map_err(Problem::internal)?,
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    Ok(response)
}

/// A meter as listed (OpenMeter's shape).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterView {
    pub slug: String,
    pub description: String,
    pub event_type: String,
    pub aggregation: String,
    pub value_property: Option<String>,
    #[schema(value_type = Object)]
    pub group_by: std::collections::BTreeMap<String, String>,
}

#[utoipa::path(get, path = "/api/v1/meters", tag = "events",
    summary = "The meters over usage events",
    responses((status = 200, body = Vec<MeterView>), crate::problem::AuthProblems))]
pub async fn list_meters(State(state): AppStateRef) -> axum::Json<Vec<MeterView>> {
    let meters = state
        .events
        .as_ref()
        .map(|sink| sink.meters.meters.clone())
        .unwrap_or_default();
    axum::Json(
        meters
            .into_iter()
            .map(|meter| MeterView {
                aggregation: serde_json::to_value(meter.aggregation)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                slug: meter.slug,
                description: meter.description,
                event_type: meter.event_type,
                value_property: meter.value_property,
                group_by: meter.group_by,
            })
            .collect(),
    )
}

/// OpenMeter's query parameters (camelCase).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct MeterQueryParams {
    /// Start (RFC 3339, inclusive).
    pub from: DateTime<Utc>,
    /// End (RFC 3339, exclusive).
    pub to: DateTime<Utc>,
    /// MINUTE, HOUR or DAY; absent: one window over the range.
    pub window_size: Option<String>,
    /// Only this subject. An admin key names the customer this way (or with
    /// `customer`).
    pub subject: Option<String>,
    /// The customer (admin keys; a customer key reads its own).
    pub customer: Option<String>,
    /// groupBy keys of the meter, comma-separated; `subject` groups by subject.
    pub group_by: Option<String>,
}

/// One window of a meter (OpenMeter's shape; `value` is a JSON number,
/// `valueDecimal` the exact decimal).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterRow {
    pub value: f64,
    pub value_decimal: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub subject: Option<String>,
    #[schema(value_type = Object)]
    pub group_by: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterQueryResult {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub window_size: Option<String>,
    pub data: Vec<MeterRow>,
}

#[utoipa::path(get, path = "/api/v1/meters/{slug}/query", tag = "events",
    summary = "A meter aggregated per window (OpenMeter's query)",
    params(("slug" = String, Path, description = "Meter slug"), MeterQueryParams),
    responses((status = 200, body = MeterQueryResult), crate::problem::Problems))]
pub async fn query_meter(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(slug): Path<String>,
    crate::problem::Query(params): crate::problem::Query<MeterQueryParams>,
) -> Result<axum::Json<MeterQueryResult>, Problem> {
    let meter = state
        .events
        .as_ref()
        .and_then(|sink| sink.meters.get(&slug).cloned())
        .ok_or_else(|| Problem::not_found("meter", &slug))?;
    let named = match (&params.customer, &params.subject) {
        (Some(customer), _) => customer.clone(),
        (None, Some(subject)) => subject.split('/').next().unwrap_or_default().to_owned(),
        (None, None) => match &principal.scope {
            Scope::Customer(own) => own.as_str().to_owned(),
            _ => {
                return Err(Problem::bad_request(
                    "name the customer with `customer` or `subject`",
                ))
            }
        },
    };
    let customer = principal.tenant(&named)?;
    if params.to <= params.from {
        return Err(Problem::bad_request("`to` must be after `from`"));
    }
    let window_ms = match params.window_size.as_deref() {
        None => 0,
        Some("MINUTE") => 60_000,
        Some("HOUR") => 3_600_000,
        Some("DAY") => 86_400_000,
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "windowSize {other:?}: MINUTE, HOUR or DAY"
            )))
        }
    };
    let (from_ms, to_ms) = (
        params.from.timestamp_millis().max(0) as u64,
        params.to.timestamp_millis().max(0) as u64,
    );
    if window_ms > 0 && (to_ms - from_ms) / window_ms > state.config.max_windows as u64 {
        return Err(Problem::bad_request(format!(
            "more than {} windows; use a larger windowSize or a shorter range",
            state.config.max_windows
        )));
    }
    let mut group_by = Vec::new();
    let mut by_subject = false;
    for key in params
        .group_by
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|key| !key.is_empty())
    {
        if key == "subject" {
            by_subject = true;
        } else if meter.group_by.contains_key(key) {
            group_by.push(key.to_owned());
        } else {
            return Err(Problem::bad_request(format!(
                "groupBy {key:?} is not a groupBy key of meter {slug} (nor `subject`)"
            )));
        }
    }
    let rows = state
        .store
        .query_meter(
            &meter,
            &MeterQuery {
                customer: customer.as_str(),
                subject: params.subject.as_deref(),
                from_ms,
                to_ms,
                window_ms,
                group_by: &group_by,
                by_subject,
            },
        )
        .await?;
    let time = |ms: u64| DateTime::<Utc>::from_timestamp_millis(ms as i64).unwrap_or_default();
    let data = rows
        .into_iter()
        .map(|row| {
            let start = row.window_start_ms.max(from_ms);
            let end = if window_ms == 0 {
                to_ms
            } else {
                (row.window_start_ms + window_ms).min(to_ms)
            };
            MeterRow {
                value: row.value.parse().unwrap_or(0.0),
                value_decimal: row.value.clone(),
                window_start: time(start),
                window_end: time(end),
                subject: by_subject.then(|| row.subject_group.clone()),
                group_by: group_by.iter().cloned().zip(row.groups).collect(),
            }
        })
        .collect();
    Ok(axum::Json(MeterQueryResult {
        from: params.from,
        to: params.to,
        window_size: params.window_size,
        data,
    }))
}
