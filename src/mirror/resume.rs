//! A download's origins in order: the first that holds the blob feeds it, and when that one breaks
//! off mid-blob the next one goes on from the same byte.
//!
//! The fill pipeline hashes every byte whatever origin it came from and verifies the whole blob at
//! the end, so switching origins at byte N costs nothing in safety: a blob stitched from a peer's
//! first half and the upstream's second half is committed only if its digest matches. This is how
//! a replica following a peer that dies mid-download still finishes its pull (the object tier or
//! the upstream takes over), and how a broken object-tier read falls back to the upstream. Only
//! failures of an origin resume; content that is wrong (too long, a digest mismatch), the disk or
//! the download's own deadline end the download as before.

use std::collections::VecDeque;

use futures_util::StreamExt;

use super::error::MirrorError;
use super::origin::{BlobOrigin, Chunks, Opened};
use crate::oci::{Digest, ErrorCode, OciError};

/// Opens the first origin that holds `digest`, and chains the rest behind it as fallbacks.
/// Origins that miss (`None`) or fail to open are passed over; when none opens, the last error
/// is the answer (the upstream's status reaches the client), or `BLOB_UNKNOWN` when every origin
/// missed.
pub(super) async fn open_first<O: BlobOrigin + 'static>(
    digest: &Digest,
    origins: Vec<O>,
) -> Result<Opened, MirrorError> {
    let mut origins = VecDeque::from(origins);
    let mut failure = None;
    while let Some(origin) = origins.pop_front() {
        match origin.open(digest, 0).await {
            Ok(Some(opened)) => {
                let chunks = Resuming {
                    digest: digest.clone(),
                    size: opened.size,
                    current: opened.chunks,
                    current_name: origin.name().to_owned(),
                    offset: 0,
                    fallbacks: origins,
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
            match self.current.next().await {
                Some(Ok(chunk)) => {
                    self.offset += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                Some(Err(error)) if resumable(&error) => {
                    if !self.take_over(&error).await {
                        return Some(Err(error));
                    }
                }
                other => return other,
            }
        }
    }

    /// Opens the next fallback at the current offset; false when none is left.
    async fn take_over(&mut self, error: &MirrorError) -> bool {
        while let Some(origin) = self.fallbacks.pop_front() {
            match origin.open(&self.digest, self.offset).await {
                Ok(Some(opened)) if self.size.is_none() || opened.size == self.size => {
                    tracing::info!(
                        digest = %self.digest,
                        from = %self.current_name,
                        to = origin.name(),
                        offset = self.offset,
                        %error,
                        "origin broke off; resuming from the next one"
                    );
                    self.current = opened.chunks;
                    self.current_name = origin.name().to_owned();
                    return true;
                }
                Ok(Some(opened)) => {
                    tracing::warn!(digest = %self.digest, origin = origin.name(), announced = ?opened.size, expected = ?self.size, "origin announced another size; passed over");
                }
                Ok(None) => {}
                Err(next_error) => {
                    tracing::debug!(digest = %self.digest, origin = origin.name(), error = %next_error, "fallback origin failed");
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;

    /// An origin over fixed bytes that breaks off after `breaks_at` bytes (if set), recording
    /// every offset it was opened at.
    struct Script {
        name: &'static str,
        bytes: Option<&'static [u8]>,
        breaks_at: Option<usize>,
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
            let end = self.breaks_at.unwrap_or(bytes.len());
            let mut parts: Vec<Result<Bytes, MirrorError>> = bytes[offset as usize..end]
                .chunks(2)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if self.breaks_at.is_some() {
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

    fn script(
        log: &Arc<Mutex<Vec<(&'static str, u64)>>>,
        name: &'static str,
        bytes: Option<&'static [u8]>,
        breaks_at: Option<usize>,
    ) -> Script {
        Script {
            name,
            bytes,
            breaks_at,
            opened_at: Arc::clone(log),
        }
    }

    #[tokio::test]
    async fn a_broken_origin_is_taken_over_at_the_same_byte() {
        let log = Arc::default();
        let origins = vec![
            script(&log, "tier", None, None),
            script(&log, "peer", Some(b"abcdefghij"), Some(4)),
            script(&log, "upstream", Some(b"abcdefghij"), None),
        ];
        let opened = open_first(&digest(), origins).await.unwrap();
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
            script(&log, "peer", Some(b"abcdefghij"), Some(6)),
            script(&log, "tier", None, None),
        ];
        let opened = open_first(&digest(), origins).await.unwrap();
        let (bytes, error) = drain(opened).await;
        assert_eq!(bytes, b"abcdef");
        assert!(
            matches!(error, Some(MirrorError::Origin { .. })),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_fallback_with_another_size_is_passed_over() {
        let log = Arc::default();
        let origins = vec![
            script(&log, "peer", Some(b"abcdefghij"), Some(2)),
            script(&log, "impostor", Some(b"abcdefghijkl"), None),
            script(&log, "upstream", Some(b"abcdefghij"), None),
        ];
        let (bytes, error) = drain(open_first(&digest(), origins).await.unwrap()).await;
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
        let origins = vec![script(&log, "tier", None, None)];
        let error = open_first(&digest(), origins).await.err().unwrap();
        assert!(
            matches!(&error, MirrorError::Request(e) if e.code == ErrorCode::BlobUnknown),
            "{error:?}"
        );
    }
}
