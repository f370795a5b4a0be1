//! The request log line and duration metric, written when the response body is done (sent,
//! failed or abandoned by the client), so they report the whole transfer, not the time to headers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::api::{Outcome, ResponseBody};
use crate::metrics::Metrics;

pub struct RequestLog {
    pub started: Instant,
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub outcome: Outcome,
    pub metrics: Arc<Metrics>,
}

/// Wraps a response body; counts what it sends and writes the log line once, at its end.
pub struct LoggedBody {
    inner: ResponseBody,
    log: Option<RequestLog>,
    sent: u64,
    failure: Option<String>,
}

impl LoggedBody {
    pub fn new(inner: ResponseBody, log: RequestLog) -> Self {
        Self {
            inner,
            log: Some(log),
            sent: 0,
            failure: None,
        }
    }

    fn finish(&mut self, complete: bool) {
        let Some(log) = self.log.take() else { return };
        let elapsed = log.started.elapsed();
        log.metrics
            .request_duration
            .with_label_values(&[log.outcome.route])
            .observe(elapsed.as_secs_f64());
        let error = self.failure.as_deref().or(log.outcome.error.as_deref());
        // One line per request; paths hold names and digests only, never credentials.
        tracing::info!(
            method = %log.method,
            path = %log.path,
            route = log.outcome.route,
            status = log.status.as_u16(),
            cache = log.outcome.cache,
            bytes = self.sent,
            complete,
            ms = millis(elapsed),
            error,
            "request"
        );
    }
}

/// A duration in milliseconds to the microsecond (`0.051`). Dividing whole microseconds gives the
/// double nearest that decimal, which prints short; `as_secs_f64() * 1000.0` printed
/// `0.051035000000000004`.
fn millis(elapsed: std::time::Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(Some(Err(error))) => {
                self.failure = Some(error.to_string());
                self.finish(false);
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    /// Bodies hyper never polls (HEAD, empty) end here complete; others end here when the client left.
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::millis;

    #[test]
    fn durations_print_as_milliseconds_to_the_microsecond() {
        assert_eq!(millis(Duration::from_nanos(51_035)).to_string(), "0.051");
        assert_eq!(
            millis(Duration::from_nanos(1_234_005_900)).to_string(),
            "1234.005"
        );
        assert_eq!(millis(Duration::ZERO).to_string(), "0");
    }
}
