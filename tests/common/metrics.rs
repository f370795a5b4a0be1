//! Reading Prometheus text: one sample's value, `None` when the series is absent, so a renamed or
//! missing metric fails the test instead of passing as "not zero".

/// The value of one series, e.g. `gantry_cache_lookups_total{kind="blob",outcome="hit"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of one series, panicking with the whole scrape when it is absent.
pub fn value(metrics: &str, series: &str) -> f64 {
    sample(metrics, series).unwrap_or_else(|| panic!("{series} is not in the scrape:\n{metrics}"))
}
