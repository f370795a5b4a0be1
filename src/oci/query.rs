//! Query strings: percent-decoded parameters, shared by the pull API (containerd's `ns=`) and the
//! control plane's filters.

/// A query parameter, percent-decoded (containerd sends `ns=host%3A5000`). `None` when absent,
/// empty, or not valid UTF-8 once decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_parameters() {
        assert_eq!(
            query_param(Some("n=1&ns=ghcr.io"), "ns").as_deref(),
            Some("ghcr.io")
        );
        assert_eq!(query_param(Some("ns="), "ns"), None);
        assert_eq!(
            query_param(Some("ns=other.example%3A5000"), "ns").as_deref(),
            Some("other.example:5000")
        );
        assert_eq!(query_param(Some("ns=%zz"), "ns"), None);
        assert_eq!(query_param(Some("ns=%4"), "ns"), None);
    }
}
