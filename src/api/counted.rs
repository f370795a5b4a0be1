//! A body wrapper that counts the bytes actually sent, frame by frame (a client that leaves early
//! is counted for what it got, not for the Content-Length it was promised), globally and for the
//! registry that served it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

use crate::metrics::Metrics;
use crate::mirror::Target;

pub struct Counted<B> {
    inner: B,
    counter: IntCounter,
    /// The registry's own counter, beside the global one.
    registry: Option<IntCounter>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, counter: IntCounter) -> Self {
        Self {
            inner,
            counter,
            registry: None,
        }
    }

    /// Counts the bytes under `counter` too.
    pub fn also(mut self, counter: IntCounter) -> Self {
        self.registry = Some(counter);
        self
    }
}

/// Counts one manifest or blob answer of `target`'s registry as a hit (`source` is `cache`) or a
/// miss, and returns the counter its bytes go to.
pub fn per_registry(metrics: &Metrics, target: &Target, source: &str) -> IntCounter {
    let series = metrics.per_registry.of(target.registry.upstream.name());
    if source == "cache" {
        series.hits.inc();
        series.bytes_from_cache.clone()
    } else {
        series.misses.inc();
        series.bytes_from_upstream.clone()
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
                if let Some(registry) = &self.registry {
                    registry.inc_by(data.len() as u64);
                }
            }
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
