//! `gantry warm`: pre-pulls images into a running mirror, so the next client pull is all cache.
//!
//! It talks to the mirror exactly as a client would (through the same upstream client gantry uses
//! for registries), resolves each tag, walks an index into the platforms asked for, and reads
//! every blob through the mirror, discarding the bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::BaseUrl;
use crate::metrics::Metrics;
use crate::oci::manifest::{Descriptor, ManifestDoc};
use crate::oci::{ImageRef, MediaType, MANIFEST_TYPES};
use crate::upstream::{CredentialSource, Pool, Timeouts, Upstream, UpstreamRequest};

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

pub struct Warmer {
    mirror: Upstream,
    /// `os/arch[/variant]`; empty means every platform of an index.
    platforms: Vec<String>,
    progress: MultiProgress,
}

impl Warmer {
    pub fn new(mirror: BaseUrl, platforms: Vec<String>, show_progress: bool) -> Self {
        let timeouts = Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(300),
            idle: Duration::from_secs(120),
        };
        let pool = Pool::new(timeouts, Arc::new(Metrics::new()));
        let name = mirror.authority().to_owned();
        let progress = if show_progress {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        };
        Self {
            mirror: Upstream::new(name, mirror, CredentialSource::None, Vec::new(), pool),
            platforms,
            progress,
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
        let accept = MANIFEST_TYPES[..4].join(", ");
        let (media_type, body) = self.manifest(&image, &image.reference, &accept).await?;
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
                    let (_, body) = self.manifest(&image, &child.digest, &accept).await?;
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
        let bar = self.progress.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(text.to_owned());
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
        accept: &str,
    ) -> Result<(String, bytes::Bytes), String> {
        let response = self
            .get(image, "manifests", reference, Some(accept))
            .await?;
        let media_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response
            .into_body()
            .collect_limited(MAX_MANIFEST)
            .await
            .map_err(|e| e.to_string())?;
        Ok((media_type, body))
    }

    /// GETs `/v2/<image>/<kind>/<reference>` from the mirror; anything but 200 is an error.
    async fn get(
        &self,
        image: &ImageRef,
        kind: &str,
        reference: &str,
        accept: Option<&str>,
    ) -> Result<http::Response<crate::upstream::UpstreamBody>, String> {
        let mut request =
            UpstreamRequest::new(Method::GET, &image.repository, image.path(kind, reference));
        request.accept = accept.and_then(|a| HeaderValue::from_str(a).ok());
        let response = self
            .mirror
            .send(&request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!(
                "the mirror answered {} for {reference}",
                response.status()
            ));
        }
        Ok(response)
    }

    async fn read_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        bar: &ProgressBar,
    ) -> Result<u64, String> {
        let response = self.get(image, "blobs", digest, None).await?;
        let mut body = response.into_body();
        let mut read = 0;
        while let Some(chunk) = body.chunk().await.map_err(|e| format!("{digest}: {e}"))? {
            read += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        Ok(read)
    }
}
