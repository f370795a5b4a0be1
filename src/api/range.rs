//! Single byte ranges (RFC 9110): `bytes=a-b`, `bytes=a-`, `bytes=-n`.

/// The result of matching a `Range` header against a blob's size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range: serve the whole blob (200). Invalid or multi-range headers are ignored,
    /// as RFC 9110 allows.
    Full,
    /// Serve `[start, end)` as a 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

pub fn resolve(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: size.saturating_sub(n),
                end: size,
            },
            None => RangeAnswer::Full,
        },
        // bytes=a-: from a to the end.
        (false, true) => match parse(first) {
            Some(start) if start < size => RangeAnswer::Partial { start, end: size },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(last)) if start <= last => {
                if start >= size {
                    RangeAnswer::Unsatisfiable
                } else {
                    RangeAnswer::Partial {
                        start,
                        end: last.saturating_add(1).min(size),
                    }
                }
            }
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeAnswer::*;

    #[test]
    fn resolves_ranges() {
        assert_eq!(resolve(None, 10), Full);
        assert_eq!(resolve(Some("bytes=0-4"), 10), Partial { start: 0, end: 5 });
        assert_eq!(resolve(Some("bytes=5-"), 10), Partial { start: 5, end: 10 });
        assert_eq!(resolve(Some("bytes=-3"), 10), Partial { start: 7, end: 10 });
        assert_eq!(
            resolve(Some("bytes=-30"), 10),
            Partial { start: 0, end: 10 }
        );
        assert_eq!(
            resolve(Some("bytes=8-100"), 10),
            Partial { start: 8, end: 10 }
        );
        assert_eq!(resolve(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=5-2"), 10), Full);
        assert_eq!(resolve(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(resolve(Some("items=0-1"), 10), Full);
        assert_eq!(resolve(Some("bytes=x-y"), 10), Full);
        assert_eq!(
            resolve(Some("bytes=18446744073709551615-"), 10),
            Unsatisfiable
        );
        assert_eq!(
            resolve(Some("bytes=0-18446744073709551615"), 10),
            Partial { start: 0, end: 10 }
        );
    }
}
