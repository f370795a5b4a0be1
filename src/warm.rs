//! `gantry warm`: pre-pulls images into a running mirror, so the next client pull is all cache.
//!
//! It talks to the mirror exactly as a client would (through the same upstream client gantry uses
//! for registries), resolves each tag, walks an index into the platforms asked for, and reads
//! every blob through the mirror, discarding the bytes. [`MirrorClient`] and the progress bars
//! are shared with `gantry export --mirror`, which reads the same way but keeps the bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::BaseUrl;
use crate::metrics::Metrics;
use crate::oci::manifest::{Descriptor, ManifestDoc};
use crate::oci::{ImageRef, MediaType, MANIFEST_TYPES};
use crate::upstream::{
    CredentialSource, Pool, Timeouts, Upstream, UpstreamBody, UpstreamError, UpstreamRequest,
};

/// Manifests larger than this are not manifests.
const MAX_MANIFEST: usize = 8 << 20;

/// What one warm run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub images: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub failures: Vec<String>,
}

/// Why a request to a running mirror failed, by which side: the mirror could not be reached,
/// or it answered but not with the content.
#[derive(Debug, thiserror::Error)]
pub enum MirrorClientError {
    #[error("the mirror at {url} did not answer: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: UpstreamError,
    },
    #[error("the mirror at {url} has no {path} (404)")]
    NotFound { url: String, path: String },
    #[error("the mirror at {url} answered {status} for {path}")]
    Status {
        url: String,
        path: String,
        status: StatusCode,
    },
    #[error("the mirror at {url}: {source}")]
    Body {
        url: String,
        #[source]
        source: UpstreamError,
    },
}

/// A running gantry (or any registry) as a client reaches it: plain `GET`s of `/v2/` paths, no
/// credentials.
pub struct MirrorClient {
    upstream: Upstream,
    url: String,
}

/// A manifest as the mirror answered it.
pub struct FetchedManifest {
    /// `Content-Type`, without parameters.
    pub media_type: String,
    /// `Docker-Content-Digest`, when the mirror sent one.
    pub digest: Option<String>,
    pub bytes: bytes::Bytes,
}

impl MirrorClient {
    pub fn new(mirror: BaseUrl) -> Self {
        let timeouts = Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(300),
            idle: Duration::from_secs(120),
        };
        let pool = Pool::new(timeouts, Arc::new(Metrics::new()));
        let name = mirror.authority().to_owned();
        Self {
            url: mirror.origin(),
            upstream: Upstream::new(name, mirror, CredentialSource::None, Vec::new(), pool),
        }
    }

    /// The mirror's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// GETs `path` (`/v2/<name>/<kind>/<reference>`) for `repository`; anything but 200 is an
    /// error.
    pub async fn get(
        &self,
        repository: &str,
        path: String,
        accept: Option<&str>,
    ) -> Result<http::Response<UpstreamBody>, MirrorClientError> {
        let mut request = UpstreamRequest::new(Method::GET, repository, path.clone());
        request.accept = accept.and_then(|a| HeaderValue::from_str(a).ok());
        let response = self.upstream.send(&request).await.map_err(|source| {
            MirrorClientError::Unreachable {
                url: self.url.clone(),
                source,
            }
        })?;
        match response.status() {
            StatusCode::OK => Ok(response),
            StatusCode::NOT_FOUND => Err(MirrorClientError::NotFound {
                url: self.url.clone(),
                path,
            }),
            status => Err(MirrorClientError::Status {
                url: self.url.clone(),
                path,
                status,
            }),
        }
    }

    /// GETs a manifest at `path`, accepting every image manifest and index type.
    pub async fn manifest(
        &self,
        repository: &str,
        path: String,
    ) -> Result<FetchedManifest, MirrorClientError> {
        let accept = MANIFEST_TYPES[..4].join(", ");
        let response = self.get(repository, path, Some(&accept)).await?;
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let media_type = header(http::header::CONTENT_TYPE)
            .map(|t| t.split(';').next().unwrap_or_default().trim().to_owned())
            .unwrap_or_default();
        let digest = header(http::header::HeaderName::from_static(
            "docker-content-digest",
        ));
        let bytes = response
            .into_body()
            .collect_limited(MAX_MANIFEST)
            .await
            .map_err(|source| self.body_error(source))?;
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes,
        })
    }

    pub fn body_error(&self, source: UpstreamError) -> MirrorClientError {
        MirrorClientError::Body {
            url: self.url.clone(),
            source,
        }
    }
}

/// Progress bars on stderr when it is a terminal, none otherwise.
pub fn progress(show: bool) -> MultiProgress {
    if show {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    }
}

/// One image's bar: `prefix [=====>    ] 3 MiB/10 MiB 2 MiB/s`.
pub fn image_bar(progress: &MultiProgress, total: u64, prefix: &str) -> ProgressBar {
    let bar = progress.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

pub struct Warmer {
    mirror: MirrorClient,
    /// `os/arch[/variant]`; empty means every platform of an index.
    platforms: Vec<String>,
    progress: MultiProgress,
}

impl Warmer {
    pub fn new(mirror: BaseUrl, platforms: Vec<String>, show_progress: bool) -> Self {
        Self {
            mirror: MirrorClient::new(mirror),
            platforms,
            progress: progress(show_progress),
        }
    }

    pub async fn warm_all(&self, images: &[String]) -> Summary {
        let mut summary = Summary::default();
        for image in images {
            match self.warm(image, &mut summary).await {
                Ok(()) => summary.images += 1,
                Err(error) => summary.failures.push(format!("{image}: {error}")),
            }
        }
        summary
    }

    async fn warm(&self, text: &str, summary: &mut Summary) -> Result<(), String> {
        let image = ImageRef::parse(text)?;
        let (media_type, body) = self.manifest(&image, &image.reference).await?;
        let doc: ManifestDoc =
            serde_json::from_slice(&body).map_err(|e| format!("unreadable manifest: {e}"))?;
        let mut images = Vec::new();
        if media_type == MediaType::OCI_INDEX
            || media_type == MediaType::DOCKER_LIST
            || !doc.manifests.is_empty()
        {
            for child in &doc.manifests {
                let wanted = self.platforms.is_empty()
                    || child
                        .platform
                        .as_ref()
                        .is_some_and(|p| self.platforms.iter().any(|w| p.matches(w)));
                if wanted {
                    let (_, body) = self.manifest(&image, &child.digest).await?;
                    images.push(
                        serde_json::from_slice::<ManifestDoc>(&body).map_err(|e| e.to_string())?,
                    );
                }
            }
            if images.is_empty() {
                return Err(format!(
                    "no platform in the index matches {}",
                    self.platforms.join(", ")
                ));
            }
        } else {
            images.push(doc);
        }
        let blobs: Vec<&Descriptor> = images
            .iter()
            .flat_map(|m| m.config.iter().chain(&m.layers))
            .collect();
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        let bar = image_bar(&self.progress, total, text);
        for blob in blobs {
            let bytes = self.read_blob(&image, &blob.digest, &bar).await?;
            summary.blobs += 1;
            summary.bytes += bytes;
        }
        bar.finish();
        Ok(())
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        reference: &str,
    ) -> Result<(String, bytes::Bytes), String> {
        let fetched = self
            .mirror
            .manifest(&image.repository, image.path("manifests", reference))
            .await
            .map_err(|e| e.to_string())?;
        Ok((fetched.media_type, fetched.bytes))
    }

    async fn read_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        bar: &ProgressBar,
    ) -> Result<u64, String> {
        let response = self
            .mirror
            .get(&image.repository, image.path("blobs", digest), None)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = response.into_body();
        let mut read = 0;
        while let Some(chunk) = body.chunk().await.map_err(|e| format!("{digest}: {e}"))? {
            read += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        Ok(read)
    }
}
