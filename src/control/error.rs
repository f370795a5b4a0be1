//! Control-plane errors and the one place they become HTTP: a status and
//! `{"error": {"code": "...", "message": "..."}}`, so the CLI can always show the message.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such route: {0}")]
    NoRoute(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("{0}")]
    BadRequest(String),
    /// A reference the caller named that matches nothing cached.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The upstream (or the mirror) failed while answering, e.g. during a refresh.
    #[error("{0}")]
    Upstream(String),
    /// Some references of a call failed (`first` is the first failure; its status and code are
    /// the answer's) while the others were applied: `results` says what happened to each.
    #[error("{first}")]
    Partly {
        first: Box<ControlError>,
        results: serde_json::Value,
    },
    /// A route whose body is not written yet.
    #[error("{0} is not built yet")]
    NotBuilt(&'static str),
}

impl ControlError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoRoute(_) => (StatusCode::NOT_FOUND, "NO_ROUTE"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, "UPSTREAM"),
            Self::NotBuilt(_) => (StatusCode::NOT_IMPLEMENTED, "NOT_BUILT"),
            Self::Partly { first, .. } => first.status_and_code(),
        }
    }

    pub fn response(&self) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        let mut body = serde_json::json!({"error": {"code": code, "message": self.to_string()}});
        if let Self::Partly { results, .. } = self {
            body["results"] = results["results"].clone();
        }
        let mut response = super::json(status, &body);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"gantry admin\""),
            );
        }
        response
    }
}
