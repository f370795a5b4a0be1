//! The parts of image manifests and indexes gantry reads: the descriptors they reference.
//!
//! Manifests are stored and served as the exact bytes the upstream sent; these structs are only
//! ever read from them (never re-serialized), and unknown fields are ignored.

use serde::Deserialize;

use super::Digest;

/// A stored or shared manifest is its media type, a newline, then the bytes exactly as the
/// upstream sent them (the digest is over those bytes only). This writes the first part.
pub fn stored_header(media_type: &str) -> Vec<u8> {
    let mut header = Vec::with_capacity(media_type.len() + 1);
    header.extend_from_slice(media_type.as_bytes());
    header.push(b'\n');
    header
}

/// The whole stored form of a manifest: [`stored_header`] then `bytes`.
pub fn encode_stored(media_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stored = stored_header(media_type);
    stored.extend_from_slice(bytes);
    stored
}

/// Splits a stored manifest into its media type and the offset where its bytes start; `None`
/// when there is no media type line.
pub fn split_stored(raw: &[u8]) -> Option<(&str, usize)> {
    let newline = raw.iter().position(|b| *b == b'\n')?;
    let media_type = std::str::from_utf8(&raw[..newline]).ok()?;
    Some((media_type, newline + 1))
}

/// A content descriptor (`config`, an entry of `layers`, `blobs` or `manifests`).
#[derive(Clone, Debug, Deserialize)]
pub struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64` or `linux/arm64/v8`, as `--platform` is written.
    pub fn matches(&self, wanted: &str) -> bool {
        let mut name = format!("{}/{}", self.os, self.architecture);
        if wanted == name {
            return true;
        }
        if let Some(variant) = &self.variant {
            name = format!("{name}/{variant}");
        }
        wanted == name
    }
}

/// An image manifest or an index, whichever the bytes are.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ManifestDoc {
    /// An index's platform manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// The OCI 1.1 artifact manifest's blobs.
    #[serde(default)]
    pub blobs: Vec<Descriptor>,
}

impl ManifestDoc {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Every digest the document references directly (child manifests of an index; config,
    /// layers and blobs of a manifest) with its size, well-formed ones only, at most `limit`.
    pub fn references(&self, limit: usize) -> Vec<(Digest, u64)> {
        self.manifests
            .iter()
            .chain(self.config.iter())
            .chain(self.layers.iter())
            .chain(self.blobs.iter())
            .filter_map(|descriptor| {
                Digest::parse(&descriptor.digest)
                    .ok()
                    .map(|digest| (digest, descriptor.size))
            })
            .take(limit)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_of_a_manifest_and_an_index() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}","size":2}},"layers":[{{"digest":"{b}","size":3}},{{"digest":"not-a-digest"}}],"annotations":{{"x":"y"}}}}"#
        );
        let doc = ManifestDoc::parse(manifest.as_bytes()).unwrap();
        let found: Vec<(String, u64)> = doc
            .references(10)
            .iter()
            .map(|(d, size)| (d.to_string(), *size))
            .collect();
        assert_eq!(found, [(a.clone(), 2), (b.clone(), 3)]);
        assert_eq!(doc.references(1).len(), 1);
        let index = format!(
            r#"{{"manifests":[{{"digest":"{a}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let doc = ManifestDoc::parse(index.as_bytes()).unwrap();
        assert_eq!(doc.references(10).len(), 1);
        let platform = doc.manifests[0].platform.as_ref().unwrap();
        assert!(platform.matches("linux/arm64") && platform.matches("linux/arm64/v8"));
        assert!(!platform.matches("linux/amd64"));
    }

    #[test]
    fn stored_form_round_trips() {
        let stored = encode_stored("application/vnd.oci.image.manifest.v1+json", b"{\n}");
        let (media_type, start) = split_stored(&stored).unwrap();
        assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(&stored[start..], b"{\n}");
        assert!(split_stored(b"no newline").is_none());
        assert!(split_stored(b"\xff\n{}").is_none());
    }
}
