//! A keyed single-flight group: callers that ask for the same key while a call for it runs wait
//! for that call's answer instead of making their own.
//!
//! Tag refreshes, token fetches and credential helpers all use it, so a burst of cold pulls costs
//! an upstream (or a subprocess) one call per key, and calls for different keys never wait for
//! each other.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
    /// Called as a caller joins a running call (a metric, usually), before it waits.
    on_join: Option<Box<dyn Fn() + Send + Sync>>,
}

/// An answer, and whether it came from a call another caller started.
pub struct Shared<V> {
    pub value: V,
    pub joined: bool,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
            on_join: None,
        }
    }

    /// A group that calls `on_join` whenever a caller joins a running call.
    pub fn counting_joins(on_join: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
            on_join: Some(Box::new(on_join)),
        }
    }

    /// Runs `work` for `key`, or waits for the call already running for it. If the caller that
    /// runs the work is cancelled, a waiting caller runs its own `work` instead, so an answer is
    /// never lost with a client. The key is forgotten once its call ends: the next caller after
    /// that runs `work` again.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Shared<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let (cell, joined) = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            match calls.get(&key) {
                Some(running) => (Arc::clone(running), true),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    calls.insert(key.clone(), Arc::clone(&cell));
                    (cell, false)
                }
            }
        };
        if let (true, Some(on_join)) = (joined, &self.on_join) {
            on_join();
        }
        let call = Forget {
            group: self,
            key,
            cell,
        };
        let value = call.cell.get_or_init(work).await.clone();
        Shared { value, joined }
    }

    #[cfg(test)]
    fn running(&self) -> usize {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes a key's call from the group when the call has an answer, or when its last caller
/// leaves without one.
struct Forget<'a, K: Eq + Hash, V> {
    group: &'a SingleFlight<K, V>,
    key: K,
    cell: Arc<OnceCell<V>>,
}

impl<K: Eq + Hash, V> Drop for Forget<'_, K, V> {
    fn drop(&mut self) {
        let mut calls = self.group.calls.lock().unwrap_or_else(|e| e.into_inner());
        let ours = calls
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.cell));
        // Two references left: the map's and ours, so no caller still waits on it.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2) {
            calls.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_of_one_key_share_one_call() {
        let counted = Arc::new(AtomicUsize::new(0));
        let group = Arc::new(SingleFlight::<String, usize>::counting_joins({
            let counted = Arc::clone(&counted);
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (group, calls) = (Arc::clone(&group), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                group
                    .run("a".to_owned(), || async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        calls.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            }));
        }
        let mut joined = 0;
        for task in tasks {
            let shared = task.await.unwrap();
            assert_eq!(shared.value, 1);
            joined += usize::from(shared.joined);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 7);
        assert_eq!(counted.load(Ordering::SeqCst), 7);
        assert_eq!(group.running(), 0, "a finished call is forgotten");
        let again = group.run("a".to_owned(), || async { 99 }).await;
        assert_eq!((again.value, again.joined), (99, false));
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let group = SingleFlight::<&str, &str>::new();
        let slow = group.run("slow", std::future::pending);
        let fast = group.run("fast", || async { "done" });
        tokio::select! {
            _ = slow => unreachable!("pending never ends"),
            fast = fast => assert_eq!(fast.value, "done"),
        }
    }

    #[tokio::test]
    async fn a_cancelled_caller_hands_the_work_to_a_waiting_one() {
        let group = Arc::new(SingleFlight::<u8, &'static str>::new());
        let first = {
            let group = Arc::clone(&group);
            tokio::spawn(async move { group.run(1, std::future::pending).await.value })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let group = Arc::clone(&group);
            tokio::spawn(async move { group.run(1, || async { "second" }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiting caller ran its own work")
            .unwrap();
        assert_eq!(second.value, "second");
        assert!(second.joined);
        assert_eq!(group.running(), 0);
    }

    #[tokio::test]
    async fn a_lone_cancelled_caller_leaves_nothing_behind() {
        let group = SingleFlight::<u8, u8>::new();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            group.run(1, std::future::pending),
        )
        .await;
        assert!(cancelled.is_err());
        assert_eq!(group.running(), 0);
    }
}
