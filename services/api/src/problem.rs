//! Errors as RFC 9457 `application/problem+json`, and extractors whose
//! rejections are problems too (axum's own are plain text).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, ToSchema};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem report: what went wrong, for a person to read (`detail`) and a
/// program to branch on (`type`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem, e.g. `urn:idlemeter:problem:not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What exactly was wrong with this request.
    pub detail: String,
    #[serde(skip)]
    retry_after_s: Option<u64>,
    #[serde(skip)]
    authenticate: bool,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:idlemeter:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            retry_after_s: None,
            authenticate: false,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// The one answer for "not there" and "not yours": a tenant cannot tell
    /// them apart.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{what} {id:?} not found"),
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let mut problem = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        problem.authenticate = true;
        problem
    }

    pub fn too_many_requests(retry_after_s: u64) -> Self {
        let mut problem = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            format!("this key's request rate limit is exhausted; retry in {retry_after_s} s"),
        );
        problem.retry_after_s = Some(retry_after_s);
        problem
    }

    /// A failure on our side. The detail is logged, not shown: it can name
    /// internals (servers, tables) a tenant has no business seeing.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request failed on the server; it was logged, retry later",
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

impl From<idlemeter_store::Error> for Problem {
    fn from(error: idlemeter_store::Error) -> Self {
        Problem::internal(error)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).expect("a problem serialises");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.authenticate {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"idlemeter\""),
            );
        }
        response
    }
}

/// `axum::extract::Query` with a problem as its rejection.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| {
                Problem::bad_request(format!("query string: {}", rejection.body_text()))
            })
    }
}

/// `axum::extract::Path` with a problem as its rejection.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection: PathRejection| {
                Problem::bad_request(format!("path: {}", rejection.body_text()))
            })
    }
}

/// `axum::Json` with a problem as its rejection.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        axum::Json::<T>::from_request(request, state)
            .await
            .map(|axum::Json(value)| Json(value))
            .map_err(|rejection: JsonRejection| match rejection {
                JsonRejection::MissingJsonContentType(_) => Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "the body must be JSON, sent with content-type: application/json",
                ),
                other => Problem::bad_request(format!("body: {}", other.body_text())),
            })
    }
}

/// The problem answers an operation documents, by status.
pub(crate) fn problem_responses(
    statuses: &[(u16, &str)],
) -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    statuses
        .iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(*description)
                .content(
                    PROBLEM_JSON,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

const BAD_REQUEST: (u16, &str) = (400, "The request is invalid; `detail` says what and where");
const UNAUTHORIZED: (u16, &str) = (401, "No API key, or not a valid one");
const NOT_FOUND: (u16, &str) = (404, "Not found, or not this key's tenant (the same answer)");
const UNSUPPORTED: (u16, &str) = (415, "The body is not sent as application/json");
const RATE_LIMITED: (u16, &str) = (429, "The key's rate limit is exhausted; see Retry-After");

/// 401 and 429: what any authenticated operation may answer.
#[derive(Debug)]
pub struct AuthProblems;

impl IntoResponses for AuthProblems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses(&[UNAUTHORIZED, RATE_LIMITED])
    }
}

/// 401, 404 and 429: an operation on a tenant's resource.
#[derive(Debug)]
pub struct Problems;

impl IntoResponses for Problems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses(&[UNAUTHORIZED, NOT_FOUND, RATE_LIMITED])
    }
}

/// [`Problems`] and 400: an operation with query or path parameters to check.
#[derive(Debug)]
pub struct QueryProblems;

impl IntoResponses for QueryProblems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses(&[BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, RATE_LIMITED])
    }
}

/// [`QueryProblems`] and 415: an operation with a JSON body.
#[derive(Debug)]
pub struct BodyProblems;

impl IntoResponses for BodyProblems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses(&[
            BAD_REQUEST,
            UNAUTHORIZED,
            NOT_FOUND,
            UNSUPPORTED,
            RATE_LIMITED,
        ])
    }
}
