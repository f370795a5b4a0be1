//! `/v2/` paths (and the cluster's peer route) → typed routes. Only the shape is checked here;
//! names, tags and digests are validated by the `oci` grammar before anything uses them.

use crate::cluster::PEER_BLOBS_PATH;

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: String,
        reference: String,
    },
    Blob {
        name: String,
        digest: String,
    },
    TagsList {
        name: String,
    },
    Referrers {
        name: String,
        digest: String,
    },
    /// `/v2/<name>/blobs/uploads/...`: push only.
    Upload,
    Catalog,
    /// `/_gantry/cluster/v1/blobs/<digest>`: another replica reading a blob this one holds or is
    /// downloading (answered only with `cluster:` configured, to the cluster secret).
    PeerBlob {
        digest: String,
    },
    NotFound,
}

impl Route {
    pub fn parse(path: &str) -> Self {
        if let Some(digest) = path.strip_prefix(PEER_BLOBS_PATH) {
            if digest.is_empty() || digest.contains('/') {
                return Route::NotFound;
            }
            return Route::PeerBlob {
                digest: digest.to_owned(),
            };
        }
        let Some(rest) = path.strip_prefix("/v2") else {
            return Route::NotFound;
        };
        if rest.is_empty() || rest == "/" {
            return Route::Base;
        }
        let Some(rest) = rest.strip_prefix('/') else {
            return Route::NotFound;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest == "_catalog" {
            return Route::Catalog;
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let n = segments.len();
        if n >= 2 && segments[n - 1] == "uploads" && segments[n - 2] == "blobs" {
            return Route::Upload;
        }
        if n < 3 {
            return Route::NotFound;
        }
        let name = || segments[..n - 2].join("/");
        let last = segments[n - 1].to_owned();
        match segments[n - 2] {
            "manifests" => Route::Manifest {
                name: name(),
                reference: last,
            },
            "blobs" => Route::Blob {
                name: name(),
                digest: last,
            },
            "tags" if last == "list" => Route::TagsList { name: name() },
            "referrers" => Route::Referrers {
                name: name(),
                digest: last,
            },
            "uploads" if n >= 4 && segments[n - 3] == "blobs" => Route::Upload,
            _ => Route::NotFound,
        }
    }

    /// The repository the client named, for the routes that address one (manifests, blobs, tags,
    /// referrers): those are resolved and checked against the pull rules before anything else.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
            Route::Base
            | Route::Upload
            | Route::Catalog
            | Route::PeerBlob { .. }
            | Route::NotFound => None,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::TagsList { .. } => "tags_list",
            Route::Referrers { .. } => "referrers",
            Route::Upload => "upload",
            Route::Catalog => "catalog",
            Route::PeerBlob { .. } => "peer_blob",
            Route::NotFound => "not_found",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pull_routes_with_nested_names() {
        assert_eq!(Route::parse("/v2/"), Route::Base);
        assert_eq!(Route::parse("/v2"), Route::Base);
        assert_eq!(
            Route::parse("/v2/library/alpine/manifests/3.20"),
            Route::Manifest {
                name: "library/alpine".into(),
                reference: "3.20".into()
            }
        );
        assert_eq!(
            Route::parse("/v2/ghcr.io/a/b/c/blobs/sha256:abc"),
            Route::Blob {
                name: "ghcr.io/a/b/c".into(),
                digest: "sha256:abc".into()
            }
        );
        assert_eq!(
            Route::parse("/v2/a/tags/list"),
            Route::TagsList { name: "a".into() }
        );
        assert_eq!(
            Route::parse("/v2/a/referrers/sha256:x"),
            Route::Referrers {
                name: "a".into(),
                digest: "sha256:x".into()
            }
        );
        // A repository may itself be called `manifests`.
        assert_eq!(
            Route::parse("/v2/manifests/manifests/latest"),
            Route::Manifest {
                name: "manifests".into(),
                reference: "latest".into()
            }
        );
    }

    #[test]
    fn repository_routes_name_their_repository() {
        for path in [
            "/v2/a/b/manifests/latest",
            "/v2/a/b/blobs/sha256:x",
            "/v2/a/b/tags/list",
            "/v2/a/b/referrers/sha256:x",
        ] {
            assert_eq!(Route::parse(path).repository(), Some("a/b"), "{path}");
        }
        for path in ["/v2/", "/v2/a/blobs/uploads/", "/v2/_catalog", "/metrics"] {
            assert_eq!(Route::parse(path).repository(), None, "{path}");
        }
    }

    #[test]
    fn recognises_push_and_oddities() {
        assert_eq!(Route::parse("/v2/a/blobs/uploads/"), Route::Upload);
        assert_eq!(
            Route::parse("/v2/a/b/blobs/uploads/some-uuid"),
            Route::Upload
        );
        assert_eq!(Route::parse("/v2/_catalog"), Route::Catalog);
        assert_eq!(Route::parse("/v3/"), Route::NotFound);
        assert_eq!(Route::parse("/v2x"), Route::NotFound);
        assert_eq!(Route::parse("/v2/a/manifests"), Route::NotFound);
        assert_eq!(Route::parse("/metrics"), Route::NotFound);
        assert_eq!(
            Route::parse("/_gantry/cluster/v1/blobs/sha256:abc"),
            Route::PeerBlob {
                digest: "sha256:abc".into()
            }
        );
        assert_eq!(Route::parse("/_gantry/cluster/v1/blobs/"), Route::NotFound);
        assert_eq!(
            Route::parse("/_gantry/cluster/v1/blobs/a/b"),
            Route::NotFound
        );
        assert_eq!(Route::parse("/_gantry/cluster/v1/blobs"), Route::NotFound);
        assert_eq!(
            Route::parse("/_gantry/cluster/v1/blobs/sha256:abc").repository(),
            None
        );
        // Traversal reaches the name grammar, which rejects it.
        assert_eq!(
            Route::parse("/v2/../x/manifests/latest"),
            Route::Manifest {
                name: "../x".into(),
                reference: "latest".into()
            }
        );
    }
}
