//! `gantry export --mirror URL`: the same bundle as an export from the store, read through a
//! running mirror's `/v2/` API instead, since a serving gantry holds its store's lock. The
//! mirror pulls whatever it has not cached from its upstream while answering, so nothing needs
//! warming first.
//!
//! With no config to say which registry the mirror serves by default, images are named as
//! docker reads them: a first component that is a host names that registry (the mirror's
//! `mirroring.source` host reaches its default registry, as in a path-prefixed pull), and no host
//! means Docker Hub. The bundle records those names, the ones the mirror's catalogue uses.

use bytes::Bytes;

use super::export::{write, ExportRequest, Exported, Root, Source};
use super::names::Names;
use super::writer::{image_error, Chunks};
use super::BundleError;
use crate::config::BaseUrl;
use crate::oci::{Algorithm, Digest, Reference};
use crate::upstream::UpstreamBody;
use crate::warm::{MirrorClient, MirrorClientError};

/// Exports `request.images` through the mirror at `mirror`.
pub async fn export_through(
    mirror: BaseUrl,
    request: &ExportRequest,
) -> Result<Exported, BundleError> {
    if request.all_cached {
        return Err(image_error(
            "export",
            "--all-cached reads the store's catalogue: it needs --config, not --mirror",
        ));
    }
    let source = MirrorSource {
        client: MirrorClient::new(mirror),
    };
    let names = Names::as_written();
    let mut roots = Vec::new();
    for text in &request.images {
        roots.push(source.root(&names, text).await?);
    }
    write(&source, &roots, request).await
}

struct MirrorSource {
    client: MirrorClient,
}

impl MirrorSource {
    /// Resolves `text` on the mirror: its root manifest, by tag or digest.
    async fn root(&self, names: &Names, text: &str) -> Result<Root, BundleError> {
        let (registry, repository, reference) = names
            .resolve(text)
            .map_err(|reason| image_error(text, reason))?;
        let path = path(&registry, &repository, "manifests", &reference.to_string());
        let fetched = self
            .client
            .manifest(&repository, path)
            .await
            .map_err(|error| self.failed(text, "the image", error))?;
        let digest = Digest::of(Algorithm::Sha256, &fetched.bytes);
        let expected = match &reference {
            Reference::Digest(named) => Some(named.to_string()),
            Reference::Tag(_) => fetched.digest.clone(),
        };
        if let Some(expected) = expected.filter(|expected| *expected != digest.to_string()) {
            return Err(image_error(
                text,
                format!(
                    "the mirror at {} sent a manifest hashing to {digest}, not {expected}",
                    self.client.url()
                ),
            ));
        }
        let media_type = if fetched.media_type.is_empty() {
            media_type_of(&fetched.bytes)
        } else {
            fetched.media_type
        };
        let tag = match reference {
            Reference::Tag(tag) => Some(tag.as_str().to_owned()),
            Reference::Digest(_) => None,
        };
        Root::new(registry, repository, tag, digest, media_type, fetched.bytes)
    }

    /// A failed request for `what` of `image`: a 404 says the mirror cannot find it.
    fn failed(&self, image: &str, what: &str, error: MirrorClientError) -> BundleError {
        match error {
            MirrorClientError::NotFound { url, .. } => {
                image_error(image, format!("{what} is not found on the mirror at {url}"))
            }
            error => image_error(image, error.to_string()),
        }
    }
}

impl Source for MirrorSource {
    type Blob = MirrorBlob;

    async fn manifest(&self, root: &Root, digest: &Digest) -> Result<Bytes, BundleError> {
        let path = path(
            &root.registry,
            &root.repository,
            "manifests",
            &digest.to_string(),
        );
        let fetched = self
            .client
            .manifest(&root.repository, path)
            .await
            .map_err(|error| self.failed(&root.shown, &format!("manifest {digest}"), error))?;
        Ok(fetched.bytes)
    }

    /// The mirror fetches what it lacks when the blob is read.
    async fn check_blob(&self, _: &Root, _: &Digest, _: u64) -> Result<(), BundleError> {
        Ok(())
    }

    async fn blob(&self, root: &Root, digest: &Digest) -> Result<MirrorBlob, BundleError> {
        let path = path(
            &root.registry,
            &root.repository,
            "blobs",
            &digest.to_string(),
        );
        let response = self
            .client
            .get(&root.repository, path, None)
            .await
            .map_err(|error| self.failed(&root.shown, &format!("blob {digest}"), error))?;
        Ok(MirrorBlob {
            body: response.into_body(),
            url: self.client.url().to_owned(),
        })
    }
}

/// A blob's body as the mirror sends it.
struct MirrorBlob {
    body: UpstreamBody,
    url: String,
}

impl Chunks for MirrorBlob {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.body
            .chunk()
            .await
            .map_err(|error| format!("from the mirror at {}: {error}", self.url))
    }
}

/// The mirror's path for `registry`'s `repository`: Docker Hub is the mirror's own namespace,
/// any other registry a path prefix.
fn path(registry: &str, repository: &str, kind: &str, reference: &str) -> String {
    if registry == "docker.io" {
        format!("/v2/{repository}/{kind}/{reference}")
    } else {
        format!("/v2/{registry}/{repository}/{kind}/{reference}")
    }
}

/// A manifest's own `mediaType`, for a mirror that sent no `Content-Type`.
fn media_type_of(bytes: &[u8]) -> String {
    serde_json::from_slice::<super::layout::Document>(bytes)
        .ok()
        .and_then(|document| document.media_type)
        .unwrap_or_default()
}
