//! The post-commit hook: work that follows a verified blob into the store without delaying it.
//!
//! A committed download posts a [`Committed`] event into a bounded queue, never waiting: when the
//! queue is full the event is dropped and counted, so a slow consumer can cost a missed upload but
//! never a client's download. The consumer is a task the hook owns; it ends once the queue's sender
//! (the [`Mirror`] holding the hook) is gone and the queue is drained. With no hook configured the
//! mirror holds `None` and a commit costs one branch. The object tier (#14) is the first consumer:
//! it uploads each committed blob below the disk store.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Mirror;
use crate::oci::Digest;

/// A blob that was verified and is now in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub digest: Digest,
    pub size: u64,
}

pub struct CommitHook {
    queue: mpsc::Sender<Committed>,
    /// Events that found the queue full (or its consumer gone).
    dropped: AtomicU64,
    consumer: JoinHandle<()>,
}

impl CommitHook {
    /// Starts `consumer` on the receiving end of a queue of `capacity` events.
    pub fn spawn<F, Fut>(capacity: usize, consumer: F) -> Self
    where
        F: FnOnce(mpsc::Receiver<Committed>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (queue, events) = mpsc::channel(capacity.max(1));
        Self {
            queue,
            dropped: AtomicU64::new(0),
            consumer: tokio::spawn(consumer(events)),
        }
    }

    /// Posts an event without waiting; a full queue drops it.
    pub(super) fn notify(&self, event: Committed) {
        if let Err(error) = self.queue.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(digest = %error.into_inner().digest, "post-commit queue full; event dropped");
        }
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes the queue and waits for the consumer to finish what it holds.
    pub async fn finish(self) {
        drop(self.queue);
        if let Err(error) = self.consumer.await {
            tracing::warn!(%error, "the post-commit consumer failed");
        }
    }
}

impl Mirror {
    /// Gives every committed download to `hook`.
    pub fn with_commit_hook(mut self, hook: CommitHook) -> Self {
        self.commit_hook = Some(hook);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{oneshot, Mutex};

    use super::*;

    fn event(byte: u8) -> Committed {
        Committed {
            digest: Digest::of(crate::oci::Algorithm::Sha256, &[byte]),
            size: u64::from(byte),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (open, gate) = oneshot::channel::<()>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = CommitHook::spawn(2, {
            let seen = Arc::clone(&seen);
            move |mut events| async move {
                // The consumer is stuck until the test opens the gate: nothing leaves the queue.
                let _ = gate.await;
                while let Some(event) = events.recv().await {
                    seen.lock().await.push(event);
                }
            }
        });
        // `notify` is not async: five posts return at once, whatever the consumer does.
        for byte in 1..=5 {
            hook.notify(event(byte));
        }
        assert_eq!(hook.dropped(), 3);
        open.send(()).unwrap();
        hook.finish().await;
        assert_eq!(*seen.lock().await, vec![event(1), event(2)]);
    }

    #[tokio::test]
    async fn the_consumer_ends_when_the_hook_is_dropped() {
        let (done, ended) = oneshot::channel();
        let hook = CommitHook::spawn(4, move |mut events| async move {
            let mut count = 0;
            while events.recv().await.is_some() {
                count += 1;
            }
            let _ = done.send(count);
        });
        hook.notify(event(1));
        assert_eq!(hook.dropped(), 0);
        drop(hook);
        assert_eq!(ended.await.unwrap(), 1);
    }
}
