//! The files of an OCI image layout and of `gantry-bundle.json`, and which entry names a bundle
//! may hold. Manifests themselves are kept as the exact bytes the upstream sent (their digests
//! are over those bytes); these structs only describe and read them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::oci::{Algorithm, Digest};

pub const OCI_LAYOUT: &str = "oci-layout";
pub const INDEX_JSON: &str = "index.json";
/// What the bundle holds, by the names the catalogue uses (see [`BundleManifest`]).
pub const BUNDLE_JSON: &str = "gantry-bundle.json";
/// `docker save`'s own listing, which docker 20.10's `docker load` needs; single-platform images only.
pub const DOCKER_MANIFEST_JSON: &str = "manifest.json";
pub const BLOBS_DIR: &str = "blobs/sha256/";

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The format of `gantry-bundle.json` this build writes and reads.
pub const BUNDLE_VERSION: u32 = 1;

/// Largest manifest, index or layout file read into memory (the registry's own manifest limit).
pub const JSON_LIMIT: u64 = 4 << 20;

/// What a bundle entry's name is, or why it is refused: only the layout's own files and
/// `blobs/sha256/<64 hex>` (so no `..`, no absolute path and no other directory can be written).
#[derive(Debug, PartialEq, Eq)]
pub enum EntryName {
    Layout,
    Index,
    Bundle,
    DockerManifest,
    Directory,
    Blob(Digest),
}

impl EntryName {
    pub fn parse(name: &[u8]) -> Result<Self, &'static str> {
        let name = std::str::from_utf8(name).map_err(|_| "the name is not UTF-8")?;
        Ok(match name {
            OCI_LAYOUT => Self::Layout,
            INDEX_JSON => Self::Index,
            BUNDLE_JSON => Self::Bundle,
            DOCKER_MANIFEST_JSON => Self::DockerManifest,
            "blobs" | "blobs/" | "blobs/sha256" | "blobs/sha256/" => Self::Directory,
            _ => {
                let hex = name
                    .strip_prefix(BLOBS_DIR)
                    .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                    .ok_or("not a name an OCI layout holds (only blobs/sha256/<64 hex digits> and the layout's files)")?;
                let digest = Digest::parse(&format!("{}:{hex}", Algorithm::Sha256.as_str()))
                    .map_err(|_| "not a sha256 digest")?;
                Self::Blob(digest)
            }
        })
    }
}

/// The path of a blob in a layout.
pub fn blob_name(digest: &Digest) -> String {
    format!("{BLOBS_DIR}{}", digest.hex())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    pub image_layout_version: String,
}

/// `index.json`, and any image index.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

/// An image manifest or an index as read here: its own media type and what it references.
#[derive(Debug, Default, Deserialize)]
pub struct Document {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub blobs: Vec<Descriptor>,
}

impl Document {
    /// Whether this is an index (it lists manifests, and has no config or layers).
    pub fn is_index(&self) -> bool {
        !self.manifests.is_empty()
            || (self.config.is_none() && self.layers.is_empty() && self.blobs.is_empty())
    }

    /// The config, layers and blobs of an image manifest.
    pub fn blob_descriptors(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers).chain(&self.blobs)
    }
}

/// `os/arch[/variant]` of an index entry, as `--platform` is written.
pub fn platform_name(platform: &serde_json::Value) -> Option<String> {
    let os = platform.get("os")?.as_str()?;
    let architecture = platform.get("architecture")?.as_str()?;
    Some(match platform.get("variant").and_then(|v| v.as_str()) {
        Some(variant) => format!("{os}/{architecture}/{variant}"),
        None => format!("{os}/{architecture}"),
    })
}

/// Whether `wanted` (`linux/arm64` or `linux/arm64/v8`) names `platform`.
pub fn platform_matches(platform: &serde_json::Value, wanted: &str) -> bool {
    let Some(full) = platform_name(platform) else {
        return false;
    };
    // `linux/arm64` names `linux/arm64/v8` too, as `--platform` does for `gantry warm`.
    full == wanted
        || (platform.get("variant").is_some()
            && full
                .rsplit_once('/')
                .is_some_and(|(short, _)| short == wanted))
}

/// `gantry-bundle.json`: what a bundle holds, by the names the catalogue records images under
/// (a layout's `ref.name` is one string and cannot say which upstream an image came from).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub version: u32,
    pub images: Vec<BundleImage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleImage {
    /// The upstream's name as the catalogue records it: `docker.io`, `ghcr.io`, `host:port`.
    pub registry: String,
    pub repository: String,
    /// `None` for an image exported by digest.
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    /// The platforms the bundle holds, for an index (`linux/amd64`, …).
    #[serde(default)]
    pub platforms: Vec<String>,
    /// False when `--platform` left some of an index's platforms out: their manifests are absent.
    pub all_platforms: bool,
    /// Bytes of every manifest and blob of the image.
    pub size: u64,
}
