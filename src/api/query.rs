//! Query-string decoding for the pull API: the `ns` parameter containerd adds to name the
//! registry it meant, and the rest of the query passed on to the upstream for listings.

pub(super) use crate::oci::query_param;

/// The query without `ns`: that one is gantry's routing hint, not something the upstream knows.
pub(super) fn query_without_ns(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("ns="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_ns_only() {
        assert_eq!(
            query_without_ns(Some("ns=x&n=2&last=a")).as_deref(),
            Some("n=2&last=a")
        );
        assert_eq!(query_without_ns(Some("ns=x")), None);
    }
}
