//! The last hour of traffic for the status page's chart: requests and bytes served (from the
//! cache, from upstreams) per interval, kept in a small in-memory ring.
//!
//! The ring is filled by one sampler task reading the Prometheus counters gantry keeps anyway, so
//! the request path does no extra work for it. The task holds the ring weakly and watches the
//! server's shutdown: it ends when the server stops or when the ring's owner ([`super::Control`])
//! is dropped, whichever comes first. Nothing survives a restart: the chart is a view of this
//! process, the counters in `/metrics` are the record.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{Control, ControlError};
use crate::metrics::Metrics;

/// How often the counters are sampled: one point of the chart.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Points kept: an hour of [`INTERVAL`]s.
pub const POINTS: usize = 360;

/// The counters at one instant. Points are the differences between consecutive samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Unix seconds.
    pub t: u64,
    pub requests: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
}

impl Sample {
    /// Reads the counters now: client requests of every route and status, and bytes served by
    /// source.
    pub fn of(metrics: &Metrics, t: u64) -> Self {
        let requests = metrics
            .requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum();
        Self {
            t,
            requests,
            bytes_from_cache: metrics.bytes_served.with_label_values(&["cache"]).get(),
            bytes_from_upstream: metrics.bytes_served.with_label_values(&["upstream"]).get(),
        }
    }
}

/// The ring of samples.
pub struct History {
    interval: Duration,
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// A ring answering at most `points` points of `interval` each.
    pub fn new(interval: Duration, points: usize) -> Self {
        Self {
            interval,
            capacity: points.max(1),
            samples: Mutex::new(VecDeque::with_capacity(points.max(1))),
        }
    }

    /// Adds a sample, dropping the oldest once the ring is full.
    pub fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples.len() >= self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The ring as `GET /api/v1/history` answers it: one point per interval, each the traffic
    /// of the interval that ends at its `t`. `now`, the counters at the time of the request,
    /// closes a last point for the interval in progress, so the chart shows a pull made a
    /// second ago rather than up to an interval later.
    pub fn json(&self, now: Option<Sample>) -> serde_json::Value {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Sample> = samples.iter().copied().collect();
        drop(samples);
        if let Some(now) = now {
            if all.last().is_some_and(|last| now.t >= last.t) {
                all.push(now);
            }
        }
        let points: Vec<serde_json::Value> = all
            .windows(2)
            .map(|pair| {
                let (before, after) = (pair[0], pair[1]);
                serde_json::json!({
                    "t": after.t,
                    "requests": after.requests.saturating_sub(before.requests),
                    "bytes_from_cache": after.bytes_from_cache.saturating_sub(before.bytes_from_cache),
                    "bytes_from_upstream": after.bytes_from_upstream.saturating_sub(before.bytes_from_upstream),
                })
            })
            .collect();
        serde_json::json!({
            "interval_seconds": self.interval.as_secs(),
            "points": points,
        })
    }

    /// Starts the sampler: a sample now (the baseline of the first point), then one every
    /// interval, until `shutdown` turns (or its sender is gone) or the ring is dropped.
    pub fn spawn_sampler(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let ring = Arc::downgrade(self);
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(history) = ring.upgrade() else {
                    return;
                };
                history.record(Sample::of(&metrics, unix_now()));
            }
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// `GET /api/v1/history`.
pub(super) async fn history(control: &Control) -> Result<serde_json::Value, ControlError> {
    Ok(control
        .history
        .json(Some(Sample::of(&control.metrics, unix_now()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64, requests: u64, cache: u64, upstream: u64) -> Sample {
        Sample {
            t,
            requests,
            bytes_from_cache: cache,
            bytes_from_upstream: upstream,
        }
    }

    #[test]
    fn points_are_the_traffic_between_samples() {
        let history = History::new(INTERVAL, POINTS);
        history.record(sample(100, 5, 1000, 200));
        history.record(sample(110, 8, 1500, 200));
        history.record(sample(120, 8, 1500, 900));
        let json = history.json(None);
        assert_eq!(json["interval_seconds"], 10);
        assert_eq!(
            json["points"],
            serde_json::json!([
                {"t": 110, "requests": 3, "bytes_from_cache": 500, "bytes_from_upstream": 0},
                {"t": 120, "requests": 0, "bytes_from_cache": 0, "bytes_from_upstream": 700},
            ])
        );
    }

    #[test]
    fn the_interval_in_progress_is_the_last_point() {
        let history = History::new(INTERVAL, POINTS);
        history.record(sample(100, 5, 0, 0));
        let json = history.json(Some(sample(103, 7, 10, 20)));
        assert_eq!(
            json["points"],
            serde_json::json!([{"t": 103, "requests": 2, "bytes_from_cache": 10, "bytes_from_upstream": 20}])
        );
        // No baseline yet: nothing to subtract from, no point.
        let empty = History::new(INTERVAL, POINTS);
        assert_eq!(
            empty.json(Some(sample(103, 7, 10, 20)))["points"],
            serde_json::json!([])
        );
    }

    #[test]
    fn the_ring_keeps_the_last_hour() {
        let history = History::new(INTERVAL, POINTS);
        for i in 0..1000u64 {
            history.record(sample(i * 10, i, 0, 0));
        }
        let json = history.json(Some(sample(10_000, 1000, 0, 0)));
        let points = json["points"].as_array().unwrap();
        assert_eq!(points.len(), POINTS);
        assert_eq!(
            points.first().unwrap()["t"],
            (1000 - POINTS as u64 + 1) * 10
        );
        assert_eq!(points.last().unwrap()["t"], 10_000);
    }

    #[test]
    fn samples_read_the_counters() {
        let metrics = Metrics::new();
        metrics
            .requests
            .with_label_values(&["blob", "GET", "200"])
            .inc_by(3);
        metrics
            .requests
            .with_label_values(&["manifest", "HEAD", "404"])
            .inc();
        metrics
            .bytes_served
            .with_label_values(&["cache"])
            .inc_by(70);
        metrics
            .bytes_served
            .with_label_values(&["upstream"])
            .inc_by(30);
        assert_eq!(Sample::of(&metrics, 9), sample(9, 4, 70, 30));
    }

    /// Short enough for a test, long enough not to spin.
    const TICK: Duration = Duration::from_millis(20);

    #[tokio::test]
    async fn the_sampler_ticks_and_ends_with_shutdown() {
        let history = Arc::new(History::new(TICK, POINTS));
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = watch::channel(false);
        let task = history.spawn_sampler(Arc::clone(&metrics), stopped);
        metrics.bytes_served.with_label_values(&["cache"]).inc_by(5);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // The baseline, then a tick per interval: each adds a point.
        while history.json(None)["points"].as_array().map_or(0, Vec::len) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no 3 points in 10 s"
            );
            tokio::time::sleep(TICK).await;
        }
        let served: u64 = history.json(None)["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|point| point["bytes_from_cache"].as_u64().unwrap())
            .sum();
        assert!(served <= 5, "{served}");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the sampler ends on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn the_sampler_ends_when_the_ring_is_dropped() {
        let history = Arc::new(History::new(TICK, POINTS));
        let (_stop, stopped) = watch::channel(false);
        let task = history.spawn_sampler(Arc::new(Metrics::new()), stopped);
        drop(history);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the sampler ends once its ring is gone")
            .unwrap();
    }
}
