//! Manifest media types and the `Accept` negotiation around them.
//!
//! The same tag can name different bytes depending on what a client accepts (an index for a
//! client that takes indexes, one platform's manifest for one that does not). Clients that take
//! every index and image manifest type (dockerd, containerd, skopeo, podman) get the same answer
//! from an upstream, so they share one tag-cache entry ([`AcceptSet::is_full`], fetched with
//! [`AcceptSet::every`]); a narrower client is answered from it when it accepts what it holds,
//! else under a key of its own Accept set.

use http::HeaderMap;

/// The manifest media types gantry knows, in the order their bits appear in an [`AcceptSet`].
pub const MANIFEST_TYPES: [&str; 6] = [
    MediaType::OCI_INDEX,
    MediaType::OCI_MANIFEST,
    MediaType::DOCKER_LIST,
    MediaType::DOCKER_MANIFEST,
    MediaType::DOCKER_V1,
    MediaType::DOCKER_V1_SIGNED,
];

pub struct MediaType;

impl MediaType {
    pub const OCI_INDEX: &'static str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &'static str = "application/vnd.oci.image.manifest.v1+json";
    pub const DOCKER_LIST: &'static str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &'static str =
        "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_V1: &'static str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_V1_SIGNED: &'static str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
}

/// The bits of the index and image manifest types, OCI and docker schema 2: a client naming all
/// four is answered by an upstream as any other such client is, whatever else it names.
const FULL: u8 = 0b1111;

/// Which known manifest media types a request's `Accept` headers name (parameters such as `q=`
/// are ignored, as distribution ignores them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcceptSet(u8);

impl AcceptSet {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut bits = 0u8;
        for value in headers.get_all(http::header::ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let media_type = item.split(';').next().unwrap_or("").trim();
                if let Some(index) = MANIFEST_TYPES
                    .iter()
                    .position(|t| t.eq_ignore_ascii_case(media_type))
                {
                    bits |= 1 << index;
                }
            }
        }
        Self(bits)
    }

    /// Every manifest type gantry knows, named in [`MANIFEST_TYPES`] order by
    /// [`Self::header_value`]: what gantry asks the upstream for on behalf of the clients
    /// sharing a tag entry, so the answer does not depend on which of them came first.
    pub fn every() -> Self {
        Self((1 << MANIFEST_TYPES.len()) - 1)
    }

    /// Whether this client takes every index and image manifest type (schema 1 types and `*/*`
    /// aside, which clients add or leave out without changing what an upstream answers them).
    pub fn is_full(self) -> bool {
        self.0 & FULL == FULL
    }

    /// Whether a manifest of `media_type` may be served to this client. A client that names no
    /// manifest type at all is served what is stored, as registries do for manifests by digest.
    pub fn accepts(self, media_type: &str) -> bool {
        if self.0 == 0 {
            return true;
        }
        MANIFEST_TYPES
            .iter()
            .position(|t| *t == media_type)
            .is_some_and(|index| self.0 & (1 << index) != 0)
    }

    /// Whether this client names `media_type` itself. A tag's shared entry answers only such
    /// clients: one naming no manifest type (`*/*`) gets from an upstream what it answers that
    /// client (distribution: a 404 for an OCI index), which gantry does not guess.
    pub fn names(self, media_type: &str) -> bool {
        !self.is_empty() && self.accepts(media_type)
    }

    /// A short stable label for cache keys, e.g. `a3`.
    pub fn key(self) -> String {
        format!("a{:x}", self.0)
    }

    /// The `Accept` header value naming exactly these types (empty when none).
    pub fn header_value(self) -> String {
        MANIFEST_TYPES
            .iter()
            .enumerate()
            .filter(|(index, _)| self.0 & (1 << index) != 0)
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(http::header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn parses_lists_and_repeated_headers_ignoring_parameters() {
        let set = AcceptSet::from_headers(&headers(&[
            "application/vnd.oci.image.index.v1+json;q=0.5, */*",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]));
        assert!(set.accepts(MediaType::OCI_INDEX));
        assert!(set.accepts(MediaType::DOCKER_MANIFEST));
        assert!(!set.accepts(MediaType::OCI_MANIFEST));
        assert_eq!(
            set.header_value(),
            "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        );
    }

    #[test]
    fn the_clients_that_take_every_index_and_manifest_type_are_full() {
        let dockerd = headers(&[
            MediaType::DOCKER_MANIFEST,
            MediaType::DOCKER_LIST,
            MediaType::OCI_INDEX,
            MediaType::OCI_MANIFEST,
        ]);
        let containerd = headers(&["application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"]);
        let skopeo = headers(&["application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json"]);
        for client in [dockerd, containerd, skopeo] {
            assert!(AcceptSet::from_headers(&client).is_full(), "{client:?}");
        }
        let no_oci_index = headers(&[
            MediaType::DOCKER_MANIFEST,
            MediaType::DOCKER_LIST,
            MediaType::OCI_MANIFEST,
        ]);
        assert!(!AcceptSet::from_headers(&no_oci_index).is_full());
        assert!(!AcceptSet::default().is_full());
        assert!(AcceptSet::every().is_full());
        assert_eq!(AcceptSet::every().header_value(), MANIFEST_TYPES.join(", "));
    }

    #[test]
    fn no_known_type_accepts_anything_stored() {
        let set = AcceptSet::from_headers(&headers(&["*/*"]));
        assert!(set.is_empty());
        assert!(set.accepts(MediaType::OCI_INDEX));
        assert!(!set.names(MediaType::OCI_INDEX));
        assert_ne!(
            set.key(),
            AcceptSet::from_headers(&headers(&[MediaType::OCI_INDEX])).key()
        );
    }
}
