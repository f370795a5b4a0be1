//! Who downloads a digest: the single flight, as a claim.
//!
//! Every request for a missing blob claims its digest. The first one is the [`Owner`]: it starts
//! the download, and its [`Claimed`] releases the digest when the download ends (or, should the
//! task die, when it is dropped). Every later one is told to follow the owner's [`Flight`]. This
//! is the local implementation, one map in this process; the fleet's Redis coordinator takes the
//! same shape (claim → own or follow, release by compare-and-delete) across replicas, where
//! following means reading from the owning peer.
//!
//! It also counts the download tasks still running, from their claim to the end of their task
//! (the commit included), so a graceful shutdown can wait for them ([`LocalCoordinator::drain`]):
//! a client has its last byte once the digest is verified, before the fsync and rename, and a
//! restart must not lose what it just downloaded.
//!
//! The operator's stats list the flights with their progress ([`LocalCoordinator::in_flight`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::download::{Flight, Phase, Progress};
use crate::oci::Digest;

type Flights = Arc<Mutex<HashMap<Digest, Running>>>;

/// A flight and when it was claimed.
struct Running {
    flight: Arc<Flight>,
    started: Instant,
}

/// One download in flight, as the operator sees it.
#[derive(Clone, Debug)]
pub struct InFlight {
    pub digest: Digest,
    /// Bytes on disk so far.
    pub received: u64,
    /// As the origin announced it, once known.
    pub size: Option<u64>,
    /// Since the digest was claimed.
    pub elapsed: Duration,
}

/// The answer to a claim.
pub(super) enum Claim {
    /// No download was running: this caller starts one.
    Owner(Owner),
    /// A download is running; its progress is shared.
    Follow(Arc<Flight>),
}

/// What the owner of a flight needs to run it.
pub(super) struct Owner {
    pub flight: Arc<Flight>,
    /// Where the download publishes its progress to every follower.
    pub progress: watch::Sender<Progress>,
    pub claim: Claimed,
    /// Counts the download task as running until it is dropped, at the end of the task.
    pub task: RunningTask,
}

/// One download task counted by its coordinator; dropped when the task ends (or never ran).
pub(super) struct RunningTask(Arc<watch::Sender<usize>>);

impl Drop for RunningTask {
    fn drop(&mut self) {
        self.0.send_modify(|running| *running -= 1);
    }
}

/// A digest this process is downloading; dropped (or [`released`](Self::release)), it is free.
pub(super) struct Claimed {
    flights: Flights,
    digest: Digest,
    flight: Arc<Flight>,
}

impl Claimed {
    /// Frees the digest: a request arriving after this finds the blob in the store or starts
    /// afresh.
    pub fn release(self) {}
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        // Only its own entry: a claim never frees a flight that succeeded it.
        if flights
            .get(&self.digest)
            .is_some_and(|running| Arc::ptr_eq(&running.flight, &self.flight))
        {
            flights.remove(&self.digest);
        }
    }
}

/// The flights of this process, at most one per digest.
pub(super) struct LocalCoordinator {
    flights: Flights,
    /// Download tasks not yet ended.
    tasks: Arc<watch::Sender<usize>>,
}

impl Default for LocalCoordinator {
    fn default() -> Self {
        Self {
            flights: Flights::default(),
            tasks: Arc::new(watch::channel(0).0),
        }
    }
}

impl LocalCoordinator {
    /// Claims `digest`; `repository` (`<registry>/<repository>`) names what a new flight is
    /// asked under.
    pub fn claim(&self, digest: &Digest, repository: impl FnOnce() -> String) -> Claim {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = flights.get(digest) {
            return Claim::Follow(Arc::clone(&running.flight));
        }
        let (flight, progress) = Flight::new(repository());
        flights.insert(
            digest.clone(),
            Running {
                flight: Arc::clone(&flight),
                started: Instant::now(),
            },
        );
        self.tasks.send_modify(|running| *running += 1);
        Claim::Owner(Owner {
            task: RunningTask(Arc::clone(&self.tasks)),
            flight: Arc::clone(&flight),
            progress,
            claim: Claimed {
                flights: Arc::clone(&self.flights),
                digest: digest.clone(),
                flight,
            },
        })
    }

    /// The flight running for `digest`, if any, without claiming it (a `HEAD` starts nothing).
    pub fn running(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .map(|running| Arc::clone(&running.flight))
    }

    /// Every download in flight with its progress, oldest first.
    pub fn in_flight(&self) -> Vec<InFlight> {
        let mut downloads: Vec<InFlight> = self
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(digest, running)| {
                let progress = running.flight.progress();
                let progress = progress.borrow();
                let received = match progress.phase {
                    Phase::Streaming { written } => written,
                    Phase::Committed => progress.verified.or(progress.size).unwrap_or(0),
                    Phase::Connecting | Phase::Failed(_) => 0,
                };
                InFlight {
                    digest: digest.clone(),
                    received,
                    size: progress.size,
                    elapsed: running.started.elapsed(),
                }
            })
            .collect();
        downloads.sort_by_key(|d| std::cmp::Reverse(d.elapsed));
        downloads
    }

    /// Waits until every download task has ended, or until `deadline`. Returns how many were
    /// still running then (abandoned: their temp files are removed at the next start).
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        let mut running = self.tasks.subscribe();
        let ended = tokio::time::timeout_at(deadline, running.wait_for(|&n| n == 0))
            .await
            .is_ok();
        if ended {
            0
        } else {
            *running.borrow()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> Digest {
        Digest::of(crate::oci::Algorithm::Sha256, &[byte])
    }

    fn owner(claim: Claim) -> Owner {
        match claim {
            Claim::Owner(owner) => owner,
            Claim::Follow(_) => panic!("expected to own the digest"),
        }
    }

    #[test]
    fn the_first_claim_owns_and_later_ones_follow_it() {
        let coordinator = LocalCoordinator::default();
        let a = digest(1);
        assert!(coordinator.running(&a).is_none());
        let owned = owner(coordinator.claim(&a, || "r/one".into()));
        assert!(owned.flight.asked_under("r/one"));
        let running = coordinator
            .running(&a)
            .expect("a claimed digest is running");
        assert!(Arc::ptr_eq(&running, &owned.flight));
        match coordinator.claim(&a, || unreachable!("a follower creates no flight")) {
            Claim::Follow(flight) => assert!(Arc::ptr_eq(&flight, &owned.flight)),
            Claim::Owner(_) => panic!("a second claim must follow"),
        }
        // Another digest is independent.
        let b = owner(coordinator.claim(&digest(2), || "r/two".into()));
        assert!(!Arc::ptr_eq(&b.flight, &owned.flight));
    }

    #[test]
    fn releasing_frees_the_digest_for_a_new_owner() {
        let coordinator = LocalCoordinator::default();
        let a = digest(1);
        let first = owner(coordinator.claim(&a, || "r/one".into()));
        first.claim.release();
        assert!(coordinator.running(&a).is_none());
        let second = owner(coordinator.claim(&a, || "r/two".into()));
        assert!(second.flight.asked_under("r/two"));
        // Dropping the owner (a task that died) frees it too.
        drop(second);
        assert!(coordinator.running(&a).is_none());
    }

    #[test]
    fn a_late_release_leaves_its_successor_alone() {
        let coordinator = LocalCoordinator::default();
        let a = digest(1);
        let Owner { claim: stale, .. } = owner(coordinator.claim(&a, || "r/one".into()));
        // As if the entry had been taken over (an expired lease, in a shared coordinator).
        coordinator.flights.lock().unwrap().remove(&a);
        let successor = owner(coordinator.claim(&a, || "r/two".into()));
        stale.release();
        let running = coordinator.running(&a).expect("the successor still runs");
        assert!(Arc::ptr_eq(&running, &successor.flight));
    }

    #[tokio::test]
    async fn drain_waits_for_every_task_until_the_deadline() {
        let coordinator = LocalCoordinator::default();
        let now = tokio::time::Instant::now;
        assert_eq!(coordinator.drain(now()).await, 0, "nothing runs");
        let first = owner(coordinator.claim(&digest(1), || "r/one".into()));
        let second = owner(coordinator.claim(&digest(2), || "r/two".into()));
        // Following claims no task.
        let _ = coordinator.claim(&digest(1), || unreachable!());
        assert_eq!(coordinator.drain(now()).await, 2, "both are abandoned");
        // Releasing the claim is not the end of the task: the commit hook and the outcome follow.
        let Owner { claim, task, .. } = first;
        claim.release();
        assert_eq!(coordinator.drain(now()).await, 2);
        let far = now() + std::time::Duration::from_secs(3600);
        let (abandoned, ()) = tokio::join!(coordinator.drain(far), async {
            drop(task);
            drop(second);
        });
        assert_eq!(abandoned, 0);
    }
}
