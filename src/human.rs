//! Sizes and ages as people read them, the way `docker images` and `kubectl get` print them:
//! shared by the operator's commands (`ctl`) and the status page (`control`).

/// `1.5GB`, `27.3MB`, `512B`: decimal units, as `docker images` shows sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.2}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `42s`, `5m`, `3h`, `2d`: the age of something `seconds` old, as `kubectl get` shows it.
pub fn human_age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanizes_sizes_and_ages() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(3_620_000), "3.62MB");
        assert_eq!(human_size(27_300_000), "27.3MB");
        assert_eq!(human_size(1_500_000_000), "1.50GB");
        assert_eq!(human_age(42), "42s");
        assert_eq!(human_age(300), "5m");
        assert_eq!(human_age(3 * 3600), "3h");
        assert_eq!(human_age(5 * 86_400), "5d");
    }
}
