//! Repository scope: cached content is served under a repository only when that repository is
//! known to reference it. Content is stored once per digest, but access is granted per
//! repository, so without this a client allowed one repository could read any other's layers by
//! digest. What a repository references is learnt from the manifests served under it, shared
//! between replicas through Redis, and otherwise asked of the upstream (whose answer decides).

use http::Method;

use super::send::{repository_request, send_ok};
use super::{Manifest, Mirror, MirrorError, Target};
use crate::oci::manifest::ManifestDoc;
use crate::oci::{AcceptSet, Digest};

/// References of one manifest linked to its repository, at most; content past them is checked
/// with the upstream when asked for (a manifest of 8 MiB could otherwise list ~50,000).
pub(super) const MAX_LINKS_PER_MANIFEST: usize = 1_000;

impl Mirror {
    /// Whether the target's repository is known to reference `digest`: from the store's links,
    /// else from another replica through Redis (then recorded here too).
    pub(super) async fn knows(&self, target: &Target, digest: &Digest) -> bool {
        let registry = target.registry.upstream.name();
        if self.store.is_linked(digest, registry, target.repo.as_str()) {
            return true;
        }
        let repository = repository_key(target);
        if self
            .tags
            .shared_link(&digest.to_string(), &repository)
            .await
        {
            self.store.link(vec![digest.clone()], &repository).await;
            return true;
        }
        false
    }

    /// Blob content served under the target's repository must be known to be its own: from the
    /// links (here or through Redis), else by the upstream's word.
    pub(super) async fn ensure_known(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<(), MirrorError> {
        if self.knows(target, digest).await {
            return Ok(());
        }
        self.confirm_with_upstream(target, "blobs", digest, None)
            .await
    }

    /// Links a blob the upstream just served under the target's repository, unless known already
    /// (so a repeated answer costs no Redis write).
    pub(super) async fn link_if_new(&self, target: &Target, digest: &Digest) {
        let registry = target.registry.upstream.name();
        if !self.store.is_linked(digest, registry, target.repo.as_str()) {
            self.link(target, vec![digest.clone()]).await;
        }
    }

    /// Records that the target's repository references these digests, here and for other replicas.
    async fn link(&self, target: &Target, digests: Vec<Digest>) {
        let repository = repository_key(target);
        self.tags.share_links(&digests, &repository).await;
        self.store.link(digests, &repository).await;
    }

    /// A manifest served under a repository links it there, with everything it references: the
    /// platform manifests of an index, the config and layers of an image. Once its references
    /// are linked, this is a single lookup. The manifest's own link is not enough to skip it: an
    /// index links its platform manifests before they are read, and a platform manifest skipped
    /// that way would leave its layers unlinked (each then confirmed with the upstream when
    /// asked for, and never linked at all when the client follows a prefetch's download).
    pub(super) async fn link_manifest(&self, target: &Target, manifest: &Manifest) {
        let registry = target.registry.upstream.name();
        if self
            .store
            .references_linked(&manifest.digest, registry, target.repo.as_str())
        {
            return;
        }
        let mut digests = vec![manifest.digest.clone()];
        match ManifestDoc::parse(&manifest.bytes) {
            Ok(doc) => digests.extend(
                doc.references(MAX_LINKS_PER_MANIFEST)
                    .into_iter()
                    .map(|(digest, _)| digest),
            ),
            Err(error) => {
                tracing::debug!(digest = %manifest.digest, %error, "a manifest whose references cannot be read")
            }
        }
        let repository = repository_key(target);
        self.tags.share_links(&digests, &repository).await;
        self.store
            .link_manifest(&manifest.digest, digests, &repository)
            .await;
    }

    /// Cached content asked for under a repository not known to reference it: the upstream
    /// decides, with a `HEAD` under that repository (its credentials, its token scope). A yes
    /// links it; a no is the upstream's own answer, so the cache is never weaker than the
    /// registry behind it.
    pub(super) async fn confirm_with_upstream(
        &self,
        target: &Target,
        kind: &str,
        digest: &Digest,
        accept: Option<AcceptSet>,
    ) -> Result<(), MirrorError> {
        let request = repository_request(Method::HEAD, target, kind, &digest.to_string(), accept);
        let result = send_ok(&target.registry.upstream, &request, |s| s.is_success()).await;
        let outcome = match &result {
            Ok(_) => "linked",
            // An error answer is the upstream's no; anything else is a failure to ask.
            Err(MirrorError::UpstreamStatus { .. }) => "refused",
            Err(_) => "failed",
        };
        self.metrics
            .repository_checks
            .with_label_values(&[outcome])
            .inc();
        result?;
        self.link(target, vec![digest.clone()]).await;
        Ok(())
    }
}

/// `<registry>/<repository>`, the name links are recorded under.
pub(super) fn repository_key(target: &Target) -> String {
    format!("{}/{}", target.registry.upstream.name(), target.repo)
}
