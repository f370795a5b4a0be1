//! A download's origins in order: the first that holds the blob feeds it, and when that one breaks
//! off mid-blob the next one goes on from the same byte; when the last one (the upstream) breaks
//! off, it is asked again from that byte, a bounded number of times.
//!
//! The fill pipeline hashes every byte whatever origin it came from and verifies the whole blob at
//! the end, so switching origins at byte N costs nothing in safety: a blob stitched from a peer's
//! first half and the upstream's second half is committed only if its digest matches. This is how
//! a replica following a peer that dies mid-download still finishes its pull (the object tier or
//! the upstream takes over), how a broken object-tier read falls back to the upstream, and how a
//! multi-GiB layer whose connection drops at 80% costs the remaining 20% instead of all of it
//! (Harbor #23600 starts again from zero). The clients following the flight see one stream: the
//! bytes go on from where they stopped, through the same hash. Only failures of an origin
//! resume, and a body that ends cleanly short of its announced size; content that is wrong (too
//! long, a digest mismatch), an answer such as `404` or `401`, the disk or the download's own
//! deadline end the download as before.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;

use super::error::MirrorError;
use super::origin::{BlobOrigin, Chunks, Opened};
use crate::metrics::ResumeMetrics;
use crate::oci::{Digest, ErrorCode, OciError};

/// The wait before the first request made again; doubled after each, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often the last origin of a download is asked again when it breaks off and no fallback is
/// left (`limits.download_resumes`, per download), with a doubling backoff between attempts. The
/// download's own deadline (`timeouts.download`) bounds the attempts and their waits.
#[derive(Clone)]
pub(super) struct Retries {
    attempts: u32,
    first_backoff: Duration,
    metrics: Option<ResumeMetrics>,
}

impl Retries {
    pub(super) fn new(attempts: u32, metrics: ResumeMetrics) -> Self {
        Self {
            attempts,
            first_backoff: FIRST_BACKOFF,
            metrics: Some(metrics),
        }
    }

    /// `gantry_download_refetched_bytes_total`, for the origin to count the bytes it drops.
    pub(super) fn refetched(&self) -> Option<prometheus::IntCounter> {
        self.metrics.as_ref().map(|m| m.refetched.clone())
    }

    fn count(&self, origin: &str, result: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.resumes.with_label_values(&[origin, result]).inc();
        }
    }
}

/// Opens the first origin that holds `digest`, and chains the rest behind it as fallbacks, the
/// last one to be asked again under `retries` once every fallback is spent.
/// Origins that miss (`None`) or fail to open are passed over; when none opens, the last error
/// is the answer (the upstream's status reaches the client), or `BLOB_UNKNOWN` when every origin
/// missed. Nothing is asked again before the first byte: an upstream that fails to answer at all
/// fails the request at once, as it did.
pub(super) async fn open_first<O: BlobOrigin + 'static>(
    digest: &Digest,
    origins: Vec<O>,
    retries: Retries,
) -> Result<Opened, MirrorError> {
    let mut origins = VecDeque::from(origins);
    let mut failure = None;
    while let Some(origin) = origins.pop_front() {
        match origin.open(digest, 0).await {
            Ok(Some(opened)) => {
                let current_name = origin.name().to_owned();
                let chunks = Resuming {
                    digest: digest.clone(),
                    size: opened.size,
                    current: opened.chunks,
                    current_name,
                    offset: 0,
                    last: origins.is_empty().then_some(origin),
                    fallbacks: origins,
                    backoff: retries.first_backoff,
                    retries,
                };
                return Ok(Opened {
                    size: opened.size,
                    chunks: chunks.into_chunks(),
                });
            }
            Ok(None) => {}
            Err(error) => {
                if !origins.is_empty() {
                    tracing::debug!(%digest, origin = origin.name(), %error, "origin failed; trying the next one");
                }
                failure = Some(error);
            }
        }
    }
    Err(failure.unwrap_or_else(|| {
        MirrorError::Request(OciError::new(
            ErrorCode::BlobUnknown,
            format!("{digest} is not held by any origin"),
        ))
    }))
}

/// Whether an origin's failure mid-blob may be taken over by the next origin.
fn resumable(error: &MirrorError) -> bool {
    matches!(
        error,
        MirrorError::Unavailable { .. } | MirrorError::Origin { .. }
    )
}

/// Whether an origin that failed to answer a request made again is worth another: an outage or a
/// server error may pass, a `404`, `401` or `429` (whose `Retry-After` is longer than any
/// backoff here) will not within one download.
fn worth_another(error: &MirrorError) -> bool {
    resumable(error)
        || matches!(error, MirrorError::UpstreamStatus { status, .. }
            if status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED)
}

struct Resuming<O> {
    digest: Digest,
    /// The whole size the first origin announced; a fallback announcing another is not the same
    /// blob's holder and is passed over.
    size: Option<u64>,
    current: Chunks,
    current_name: String,
    /// Bytes yielded so far: where a fallback starts.
    offset: u64,
    fallbacks: VecDeque<O>,
    /// The chain's last origin (the upstream, in a download) once it has been asked: it is asked
    /// again when it breaks off, with no fallback left behind it.
    last: Option<O>,
    retries: Retries,
    /// The wait before the next request made again.
    backoff: Duration,
}

impl<O: BlobOrigin + 'static> Resuming<O> {
    fn into_chunks(self) -> Chunks {
        Box::pin(futures_util::stream::unfold(
            Some(self),
            |state| async move {
                let mut state = state?;
                let item = state.next().await?;
                // After an error the stream ends: the fill has failed.
                let state = item.is_ok().then_some(state);
                Some((item, state))
            },
        ))
    }

    async fn next(&mut self) -> Option<Result<bytes::Bytes, MirrorError>> {
        loop {
            let broke = match self.current.next().await {
                Some(Ok(chunk)) => {
                    self.offset += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                Some(Err(error)) if resumable(&error) => Some(error),
                // A clean end short of the announced size: the connection was closed early.
                None if self.size.is_some_and(|size| self.offset < size) => None,
                other => return other,
            };
            if let Err(end) = self.take_over(broke).await {
                // `None`: a short body with nothing left to ask ends cleanly, and the fill's
                // size check names it.
                return end.map(Err);
            }
        }
    }

    fn holds_the_same_blob(&self, opened: &Opened) -> bool {
        self.size.is_none() || opened.size == self.size
    }

    /// Goes on from the next fallback at the current offset, or else from the last origin asked
    /// again. `broke` is why the current origin stopped (`None`: it ended short). `Err` is how
    /// the stream ends when nothing took over: the latest failure, or `None` for a clean end.
    async fn take_over(&mut self, broke: Option<MirrorError>) -> Result<(), Option<MirrorError>> {
        let why = broke.as_ref().map_or_else(
            || format!("the body ended short of {:?} bytes", self.size),
            ToString::to_string,
        );
        while let Some(origin) = self.fallbacks.pop_front() {
            match origin.open(&self.digest, self.offset).await {
                Ok(Some(opened)) if self.holds_the_same_blob(&opened) => {
                    tracing::info!(
                        digest = %self.digest,
                        from = %self.current_name,
                        to = origin.name(),
                        offset = self.offset,
                        error = %why,
                        "origin broke off; resuming from the next one"
                    );
                    self.current = opened.chunks;
                    self.current_name = origin.name().to_owned();
                    self.last = self.fallbacks.is_empty().then_some(origin);
                    return Ok(());
                }
                Ok(Some(opened)) => {
                    tracing::warn!(digest = %self.digest, origin = origin.name(), announced = ?opened.size, expected = ?self.size, "origin announced another size; passed over");
                }
                Ok(None) => {}
                Err(next_error) => {
                    tracing::debug!(digest = %self.digest, origin = origin.name(), error = %next_error, "fallback origin failed");
                    if self.fallbacks.is_empty() && worth_another(&next_error) {
                        self.last = Some(origin);
                    }
                }
            }
        }
        let mut failure = broke;
        let Some(origin) = self.last.take() else {
            return Err(failure);
        };
        while self.retries.attempts > 0 {
            self.retries.attempts -= 1;
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            match origin.open(&self.digest, self.offset).await {
                Ok(Some(opened)) if self.holds_the_same_blob(&opened) => {
                    tracing::info!(
                        digest = %self.digest,
                        origin = origin.name(),
                        offset = self.offset,
                        attempts_left = self.retries.attempts,
                        error = %why,
                        "origin broke off; asked it again from the byte reached"
                    );
                    self.retries.count(origin.name(), "resumed");
                    self.current = opened.chunks;
                    self.current_name = origin.name().to_owned();
                    self.last = Some(origin);
                    return Ok(());
                }
                Ok(Some(opened)) => {
                    tracing::warn!(digest = %self.digest, origin = origin.name(), announced = ?opened.size, expected = ?self.size, "origin asked again announced another size");
                    break;
                }
                Ok(None) => break,
                Err(error) if worth_another(&error) => {
                    tracing::debug!(digest = %self.digest, origin = origin.name(), %error, "origin asked again failed");
                    self.retries.count(origin.name(), "failed");
                    failure = Some(error);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        tracing::warn!(digest = %self.digest, origin = origin.name(), offset = self.offset, error = %why, "origin broke off; the download ends");
        self.retries.count(origin.name(), "gave_up");
        Err(failure)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;

    /// How a [`Script`] answers one `open`.
    #[derive(Clone)]
    enum Answer {
        /// Every byte from the offset.
        Whole,
        /// The bytes up to this one, then a failure of the origin.
        BreaksAt(usize),
        /// The bytes up to this one, then a clean end.
        EndsAt(usize),
        /// No answer: the upstream's status.
        Status(StatusCode),
    }

    /// An origin over fixed bytes answering each `open` with the next of its `answers` (the last
    /// one for good), recording every offset it was opened at.
    struct Script {
        name: &'static str,
        bytes: Option<&'static [u8]>,
        answers: Mutex<VecDeque<Answer>>,
        opened_at: Arc<Mutex<Vec<(&'static str, u64)>>>,
    }

    impl BlobOrigin for Script {
        fn name(&self) -> &str {
            self.name
        }

        async fn open(&self, _: &Digest, offset: u64) -> Result<Option<Opened>, MirrorError> {
            self.opened_at.lock().unwrap().push((self.name, offset));
            let Some(bytes) = self.bytes else {
                return Ok(None);
            };
            let answer = {
                let mut answers = self.answers.lock().unwrap();
                if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    answers.front().cloned().unwrap_or(Answer::Whole)
                }
            };
            let (end, breaks) = match answer {
                Answer::Whole => (bytes.len(), false),
                Answer::BreaksAt(end) => (end, true),
                Answer::EndsAt(end) => (end, false),
                Answer::Status(status) => {
                    return Err(MirrorError::UpstreamStatus {
                        registry: self.name.into(),
                        status,
                        retry_after: None,
                        body: None,
                    })
                }
            };
            let mut parts: Vec<Result<Bytes, MirrorError>> = bytes[offset as usize..end]
                .chunks(2)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if breaks {
                parts.push(Err(MirrorError::Origin {
                    origin: self.name.into(),
                    source: Arc::new(std::io::Error::other("broke off")),
                }));
            }
            Ok(Some(Opened {
                size: Some(bytes.len() as u64),
                chunks: Box::pin(futures_util::stream::iter(parts)),
            }))
        }
    }

    fn digest() -> Digest {
        Digest::of(crate::oci::Algorithm::Sha256, b"x")
    }

    async fn drain(opened: Opened) -> (Vec<u8>, Option<MirrorError>) {
        let mut chunks = opened.chunks;
        let mut bytes = Vec::new();
        while let Some(item) = chunks.next().await {
            match item {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(error) => return (bytes, Some(error)),
            }
        }
        (bytes, None)
    }

    type Log = Arc<Mutex<Vec<(&'static str, u64)>>>;

    fn script(
        log: &Log,
        name: &'static str,
        bytes: Option<&'static [u8]>,
        answers: &[Answer],
    ) -> Script {
        Script {
            name,
            bytes,
            answers: Mutex::new(answers.iter().cloned().collect()),
            opened_at: Arc::clone(log),
        }
    }

    /// `attempts` requests made again, without waiting between them.
    fn retries(attempts: u32) -> Retries {
        Retries {
            attempts,
            first_backoff: Duration::from_millis(1),
            metrics: None,
        }
    }

    #[tokio::test]
    async fn a_broken_origin_is_taken_over_at_the_same_byte() {
        let log = Arc::default();
        let origins = vec![
            script(&log, "tier", None, &[]),
            script(&log, "peer", Some(b"abcdefghij"), &[Answer::BreaksAt(4)]),
            script(&log, "upstream", Some(b"abcdefghij"), &[]),
        ];
        let opened = open_first(&digest(), origins, retries(0)).await.unwrap();
        assert_eq!(opened.size, Some(10));
        let (bytes, error) = drain(opened).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, b"abcdefghij");
        assert_eq!(
            *log.lock().unwrap(),
            vec![("tier", 0), ("peer", 0), ("upstream", 4)]
        );
    }

    #[tokio::test]
    async fn with_no_fallback_left_the_origin_error_ends_the_stream() {
        let log = Arc::default();
        let origins = vec![
            script(&log, "peer", Some(b"abcdefghij"), &[Answer::BreaksAt(6)]),
            script(&log, "tier", None, &[]),
        ];
        let opened = open_first(&digest(), origins, retries(3)).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert_eq!(bytes, b"abcdef");
        assert!(
            matches!(error, Some(MirrorError::Origin { .. })),
            "{error:?}"
        );
        // The peer is not the chain's last origin: it is not asked again.
        assert_eq!(*log.lock().unwrap(), vec![("peer", 0), ("tier", 6)]);
    }

    #[tokio::test]
    async fn a_fallback_with_another_size_is_passed_over() {
        let log = Arc::default();
        let origins = vec![
            script(&log, "peer", Some(b"abcdefghij"), &[Answer::BreaksAt(2)]),
            script(&log, "impostor", Some(b"abcdefghijkl"), &[]),
            script(&log, "upstream", Some(b"abcdefghij"), &[]),
        ];
        let opened = open_first(&digest(), origins, retries(0)).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, b"abcdefghij");
        assert_eq!(
            *log.lock().unwrap(),
            vec![("peer", 0), ("impostor", 2), ("upstream", 2)]
        );
    }

    #[tokio::test]
    async fn every_origin_missing_is_blob_unknown() {
        let log = Arc::default();
        let origins = vec![script(&log, "tier", None, &[])];
        let error = open_first(&digest(), origins, retries(3))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, MirrorError::Request(e) if e.code == ErrorCode::BlobUnknown),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn the_last_origin_is_asked_again_from_the_byte_reached() {
        let log = Arc::default();
        let answers = [
            Answer::BreaksAt(4),
            Answer::EndsAt(7),
            Answer::Status(StatusCode::BAD_GATEWAY),
            Answer::Whole,
        ];
        let origins = vec![script(&log, "upstream", Some(b"abcdefghij"), &answers)];
        let opened = open_first(&digest(), origins, retries(3)).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, b"abcdefghij");
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                ("upstream", 0),
                ("upstream", 4),
                ("upstream", 7),
                ("upstream", 7)
            ]
        );
    }

    #[tokio::test]
    async fn the_attempts_run_out_with_the_latest_failure() {
        let log = Arc::default();
        let origins = vec![script(
            &log,
            "upstream",
            Some(b"abcdefghij"),
            &[Answer::BreaksAt(5)],
        )];
        let opened = open_first(&digest(), origins, retries(2)).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert_eq!(bytes, b"abcde");
        assert!(
            matches!(error, Some(MirrorError::Origin { .. })),
            "{error:?}"
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec![("upstream", 0), ("upstream", 5), ("upstream", 5)]
        );
    }

    #[tokio::test]
    async fn a_short_body_with_no_attempt_left_ends_cleanly_for_the_size_check() {
        let log = Arc::default();
        let origins = vec![script(
            &log,
            "upstream",
            Some(b"abcdefghij"),
            &[Answer::EndsAt(6)],
        )];
        let opened = open_first(&digest(), origins, retries(0)).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert_eq!(bytes, b"abcdef");
        assert!(error.is_none(), "{error:?}");
        assert_eq!(*log.lock().unwrap(), vec![("upstream", 0)]);
    }

    #[tokio::test]
    async fn an_answer_not_worth_another_ends_the_attempts() {
        for status in [
            StatusCode::NOT_FOUND,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS,
        ] {
            let log = Arc::default();
            let answers = [Answer::BreaksAt(3), Answer::Status(status)];
            let origins = vec![script(&log, "upstream", Some(b"abcdefghij"), &answers)];
            let opened = open_first(&digest(), origins, retries(3)).await.unwrap();
            let (bytes, error) = drain(opened).await;
            assert_eq!(bytes, b"abc");
            assert!(
                matches!(&error, Some(MirrorError::UpstreamStatus { status: s, .. }) if *s == status),
                "{status}: {error:?}"
            );
            assert_eq!(
                *log.lock().unwrap(),
                vec![("upstream", 0), ("upstream", 3)],
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn nothing_is_asked_again_before_the_first_byte() {
        let log = Arc::default();
        let answers = [Answer::Status(StatusCode::SERVICE_UNAVAILABLE)];
        let origins = vec![script(&log, "upstream", Some(b"abcdefghij"), &answers)];
        let error = open_first(&digest(), origins, retries(3))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, MirrorError::UpstreamStatus { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE),
            "{error:?}"
        );
        assert_eq!(*log.lock().unwrap(), vec![("upstream", 0)]);
    }
}
