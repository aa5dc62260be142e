//! The API's error answer: a status code and a JSON body that names what was
//! wrong (and, for input, which field).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use docket::RunStatus;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer of the REST API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code: `invalid_json`, `invalid_field`,
    /// `invalid_parameter`, `unknown_job`, `unauthorized`, `forbidden`,
    /// `not_found`, `wrong_state`, `conflict`, `stale_lease`, `content_too_large`,
    /// `uri_too_long`, `headers_too_large`, `unavailable`, `internal`,
    /// `no_route`, `method_not_allowed`.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
    /// The input field at fault (a JSON path such as `runs[2].job`, or a
    /// query parameter or header name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The run's status, for `wrong_state`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_status: Option<String>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body's detail.
    pub detail: ErrorDetail,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: ErrorDetail {
                code,
                message: message.into(),
                field: None,
                current_status: None,
            },
        }
    }

    /// Names the field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    /// 400: the body is not JSON.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// 422: a field has the wrong type or value.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message).field(field)
    }

    /// 400: a query parameter is wrong or unknown.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_parameter", message).field(param)
    }

    /// 404: no such run in the caller's tenant (another tenant's run answers
    /// the same, so ids do not leak).
    pub fn run_not_found(id: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("run {id} not found"),
        )
    }

    /// 409: the run's state does not allow the command.
    pub fn wrong_state(current: RunStatus, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "wrong_state", message);
        e.detail.current_status = Some(current.to_string());
        e
    }

    /// 413: the body or the input is over the limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "content_too_large", message)
    }

    /// 401: no valid token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 503: the store is unreachable or busy.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500: a fault of the server itself.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.detail.message, "request failed");
        }
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut res = (self.status, axum::Json(ErrorBody { error: self.detail })).into_response();
        if unauthorized {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"docket\""),
            );
        }
        res
    }
}

impl From<docket::Error> for ApiError {
    fn from(e: docket::Error) -> Self {
        use docket::Error as E;
        match e {
            E::UnknownJob(job) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_job",
                format!("unknown job `{job}`: it is not registered on this server"),
            )
            .field("job"),
            E::ContentTooLarge { job, size, limit } => ApiError::too_large(format!(
                "input of job `{job}` is {size} bytes, the limit is {limit} bytes"
            ))
            .field("input"),
            E::RunNotFound(id) => ApiError::run_not_found(id),
            E::WrongState {
                run_id,
                current,
                message,
            } => ApiError::wrong_state(current, format!("run {run_id} is {current}: {message}")),
            E::WaitTimedOut(run) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("run {} is still {}", run.id, run.status),
            ),
            E::InvalidJob { job, problem } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_job",
                format!("invalid job `{job}`: {problem}"),
            ),
            E::InvalidSchedule {
                schedule,
                field,
                message,
            } => ApiError::invalid_field(
                field.clone(),
                format!("invalid schedule `{schedule}`: `{field}`: {message}"),
            ),
            E::ScheduleNotFound(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("schedule `{name}` not found"),
            ),
            E::Store(s) => s.into(),
            E::InvalidInput(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m)
            }
        }
    }
}

impl From<docket_store::StoreError> for ApiError {
    fn from(e: docket_store::StoreError) -> Self {
        use docket_store::StoreError as S;
        match e {
            S::NotFound(id) => ApiError::run_not_found(id),
            S::WrongState {
                run_id,
                current,
                message,
            } => ApiError::wrong_state(current, format!("run {run_id} is {current}: {message}")),
            S::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            // A worker wrote under a lease that no longer holds the run:
            // refused, and recorded by the store (`stale_write_refused`).
            e @ S::StaleLease { .. } => {
                let S::StaleLease { status, .. } = &e else {
                    unreachable!()
                };
                let mut err = ApiError::new(StatusCode::CONFLICT, "stale_lease", e.to_string());
                err.detail.current_status = Some(status.to_string());
                err
            }
            S::Database(m) => ApiError::unavailable(format!("the store is unavailable: {m}")),
            // The caller's value: its field is named as in the request
            // body (`input`, `data`, `updated_variables`).
            e @ S::TooDeep { .. } => {
                let S::TooDeep { field, .. } = &e else {
                    unreachable!()
                };
                ApiError::invalid_field(field.clone(), e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
