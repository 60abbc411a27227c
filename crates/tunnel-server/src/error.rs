//! Every error the API returns: a status and `{"error": {"code", "message"}}`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tunnel_protocol::{ErrorBody, ErrorDetail, Invalid};
use tunnel_store::StoreError;

/// An error answer. Built from validation, auth and store errors; never carries internals.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Stale(m) => ApiError::new(StatusCode::CONFLICT, "stale_attempt", m),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Settled { code, message } => {
                ApiError::new(StatusCode::CONFLICT, code, message)
            }
            StoreError::QueueFull(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", m)
            }
            StoreError::Unavailable(m) => {
                tracing::error!(error = %m, "Store unavailable.");
                ApiError::unavailable("the database is unavailable; try again")
            }
            e
            @ (StoreError::Database(_) | StoreError::Postgres { .. } | StoreError::Corrupt(_)) => {
                tracing::error!(error = %e, "Store error.");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

/// JSON body extractor whose rejections are [`ApiError`]s (axum's are plain text).
pub(crate) struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(missing_json_content_type());
        }
        // Boxed: reading the body is the largest step of a handler's future, and the
        // future of a parked long-poll would carry its room while it waits.
        let bytes = Box::pin(axum::body::Bytes::from_request(req, state))
            .await
            .map_err(|e| json_rejection(e.into()))?;
        // Plain serde_json: axum's `Json` tracks the path of every value it reads
        // (serde_path_to_error), which costs a tenth of a request's CPU. A body that does not
        // parse is read again through it, for the error that names where.
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Json(v)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(v)) => Ok(Json(v)),
                Err(rejection) => Err(json_rejection(rejection)),
            },
        }
    }
}

/// `application/json`, or any `application/…+json`, with any parameters (as axum's `Json`).
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    if !ty.eq_ignore_ascii_case("application") || !token(sub) {
        return false;
    }
    let suffix = sub.rsplit_once('+').map_or(sub, |(_, s)| s);
    sub.eq_ignore_ascii_case("json") || suffix.eq_ignore_ascii_case("json")
}

fn missing_json_content_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as JSON with `Content-Type: application/json`",
    )
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => missing_json_content_type(),
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than the server accepts (see --max-body-bytes)",
            )
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request(format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => ApiError::bad_request(format!(
            "the body does not match the schema: {}",
            e.body_text()
        )),
        other => ApiError::bad_request(other.body_text()),
    }
}

/// Query extractor with JSON rejections.
pub(crate) struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::bad_request(format!("bad query string: {}", e.body_text()))
            })
    }
}

/// Path extractor with JSON rejections.
pub(crate) struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request(format!("bad path: {}", e.body_text()))
            })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::json_content_type;

    #[test]
    fn json_content_types_as_axum_takes_them() {
        let is_json = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            }
            json_content_type(&h)
        };
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=utf-8",
            "Application/JSON",
            "application/cloudevents+json",
        ] {
            assert!(is_json(Some(ok)), "{ok}");
        }
        for not in [
            None,
            Some("text/json"),
            Some("application/jsonx"),
            Some("application/json garbage"),
            Some("application/"),
            Some("json"),
            Some(""),
            Some("text/plain"),
        ] {
            assert!(!is_json(not), "{not:?}");
        }
    }
}
