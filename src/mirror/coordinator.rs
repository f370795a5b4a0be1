//! Who downloads a digest: the single flight, as a claim.
//!
//! Every request for a missing blob claims its digest. The first one is the [`Owner`]: it starts
//! the download, and its [`Claimed`] releases the digest when the download ends (or, should the
//! task die, when it is dropped). Every later one is told to follow the owner's [`Flight`]. This
//! is the local implementation, one map in this process; the fleet's Redis coordinator takes the
//! same shape (claim → own or follow, release by compare-and-delete) across replicas, where
//! following means reading from the owning peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::download::{Flight, Progress};
use crate::oci::Digest;

type Flights = Arc<Mutex<HashMap<Digest, Arc<Flight>>>>;

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
            .is_some_and(|running| Arc::ptr_eq(running, &self.flight))
        {
            flights.remove(&self.digest);
        }
    }
}

/// The flights of this process, at most one per digest.
#[derive(Default)]
pub(super) struct LocalCoordinator {
    flights: Flights,
}

impl LocalCoordinator {
    /// Claims `digest`; `repository` (`<registry>/<repository>`) names what a new flight is
    /// asked under.
    pub fn claim(&self, digest: &Digest, repository: impl FnOnce() -> String) -> Claim {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(digest) {
            return Claim::Follow(Arc::clone(flight));
        }
        let (flight, progress) = Flight::new(repository());
        flights.insert(digest.clone(), Arc::clone(&flight));
        Claim::Owner(Owner {
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
            .cloned()
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
}
