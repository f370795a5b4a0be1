//! Which repositories are known to reference each stored digest.
//!
//! The store is content-addressed, one file per digest, shared by every repository and registry.
//! A registry scopes content to repositories (distribution keeps a link per repository), and a
//! pull-through cache must not be weaker: a client allowed on `library/small` must not read a
//! `library/big` layer just because its digest is cached. So the mirror serves a cached digest
//! under a repository only when a link says that repository references it (its manifest listed
//! it, or the upstream served it under that repository), and asks the upstream otherwise.
//!
//! Links live in memory (a hash lookup on the warm path) and on disk beside the content,
//! `links/<algorithm>/<xx>/<hex>`, one `<registry>/<repository>` per line, appended. They are
//! loaded at start-up for the entries the store holds, and leave with their entry on eviction.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::oci::{Algorithm, Digest};

/// Repositories linked to one digest; usually one or two.
type Repositories = Vec<Arc<str>>;

pub struct Links {
    root: PathBuf,
    linked: RwLock<HashMap<Digest, Repositories>>,
    /// Manifests whose references were linked under a repository by this process. Not the same
    /// as the manifest's own link: an index links its platform manifests before anyone has read
    /// them, so a linked manifest may have references no one linked yet. In memory only: after a
    /// restart, the first time each manifest is served its references are linked again (known
    /// ones cost nothing).
    expanded: RwLock<HashMap<Digest, Repositories>>,
    /// Entries a gantry without links had cached (found when a store first gets `links/`): no one
    /// knows which repositories reference them, and refusing them would break offline pulls from
    /// an upgraded store, so they are served under any repository until they leave the store.
    legacy: RwLock<std::collections::HashSet<Digest>>,
}

/// Under the links root: the digests of [`Links::legacy`], one per line.
const LEGACY_FILE: &str = "legacy";

impl Links {
    /// Loads the links of the digests `keep` accepts and removes the files of the others (their
    /// content is gone).
    pub fn open(root: &Path, keep: impl Fn(&Digest) -> bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let mut linked = HashMap::new();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let Ok(prefixes) = std::fs::read_dir(root.join(algorithm.as_str())) else {
                continue;
            };
            for prefix in prefixes.flatten() {
                let Ok(entries) = std::fs::read_dir(prefix.path()) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let digest = entry.file_name().to_str().and_then(|hex| {
                        Digest::parse(&format!("{}:{hex}", algorithm.as_str())).ok()
                    });
                    match digest {
                        Some(digest) if keep(&digest) => {
                            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                            let mut repositories: Repositories = Vec::new();
                            for line in text.lines().filter(|l| !l.is_empty()) {
                                if !repositories.iter().any(|r| &**r == line) {
                                    repositories.push(Arc::from(line));
                                }
                            }
                            linked.insert(digest, repositories);
                        }
                        _ => {
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
            }
        }
        let legacy = std::fs::read_to_string(root.join(LEGACY_FILE))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| Digest::parse(line).ok())
            .filter(|digest| keep(digest))
            .collect();
        Ok(Self {
            root: root.to_owned(),
            linked: RwLock::new(linked),
            expanded: RwLock::new(HashMap::new()),
            legacy: RwLock::new(legacy),
        })
    }

    /// Marks entries cached before links existed as served under any repository (see
    /// [`Links::legacy`]); called once, when a store that has content first gets `links/`.
    pub fn adopt_legacy(&self, digests: Vec<Digest>) -> std::io::Result<()> {
        let text: String = digests.iter().map(|d| format!("{d}\n")).collect();
        std::fs::write(self.root.join(LEGACY_FILE), text)?;
        self.legacy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(digests);
        Ok(())
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Whether `<registry>/<repository>` references `digest`; compares in place, allocating
    /// nothing (this runs on every warm request).
    pub fn contains(&self, digest: &Digest, registry: &str, repository: &str) -> bool {
        if names_in(&self.linked, digest, registry, repository) {
            return true;
        }
        let legacy = self.legacy.read().unwrap_or_else(|e| e.into_inner());
        !legacy.is_empty() && legacy.contains(digest)
    }

    /// Whether the references of manifest `digest` were linked under `<registry>/<repository>`
    /// (see [`Links::expanded`]).
    pub fn expanded(&self, digest: &Digest, registry: &str, repository: &str) -> bool {
        names_in(&self.expanded, digest, registry, repository)
    }

    /// Records that the references of manifest `digest` are linked under `repository`; call it
    /// once they are.
    pub fn mark_expanded(&self, digest: &Digest, repository: &str) {
        let mut expanded = self.expanded.write().unwrap_or_else(|e| e.into_inner());
        let repositories = expanded.entry(digest.clone()).or_default();
        if !repositories.iter().any(|r| &**r == repository) {
            repositories.push(Arc::from(repository));
        }
    }

    /// Records that `repository` references `digest`; `false` if it was known already. The line
    /// is appended to the digest's file so it survives a restart.
    pub fn insert(&self, digest: &Digest, repository: &str) -> bool {
        {
            let mut linked = self.linked.write().unwrap_or_else(|e| e.into_inner());
            let repositories = linked.entry(digest.clone()).or_default();
            if repositories.iter().any(|r| &**r == repository) {
                return false;
            }
            repositories.push(Arc::from(repository));
        }
        if let Err(error) = self.append(digest, repository) {
            tracing::warn!(%digest, %error, "cannot persist a repository link; it holds until a restart");
        }
        true
    }

    fn append(&self, digest: &Digest, repository: &str) -> std::io::Result<()> {
        let path = self.path(digest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // One short write with O_APPEND: concurrent appends do not interleave within a line.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.write_all(format!("{repository}\n").as_bytes())
    }

    /// Forgets every link of a digest whose content left the store.
    pub fn remove(&self, digest: &Digest) {
        self.legacy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        self.expanded
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        let had = self
            .linked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest)
            .is_some();
        if had {
            let _ = std::fs::remove_file(self.path(digest));
        }
    }
}

/// Whether `map` holds `<registry>/<repository>` for `digest`, compared in place.
fn names_in(
    map: &RwLock<HashMap<Digest, Repositories>>,
    digest: &Digest,
    registry: &str,
    repository: &str,
) -> bool {
    let names = |linked: &str| {
        linked.len() == registry.len() + 1 + repository.len()
            && linked.starts_with(registry)
            && linked.as_bytes()[registry.len()] == b'/'
            && linked.ends_with(repository)
    };
    map.read()
        .unwrap_or_else(|e| e.into_inner())
        .get(digest)
        .is_some_and(|repositories| repositories.iter().any(|r| names(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> Digest {
        Digest::of(Algorithm::Sha256, &[byte])
    }

    #[test]
    fn links_survive_a_reopen_and_leave_with_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("links");
        let (a, b) = (digest(1), digest(2));
        let links = Links::open(&root, |_| true).unwrap();
        assert!(links.insert(&a, "docker.io/library/small"));
        assert!(
            !links.insert(&a, "docker.io/library/small"),
            "known already"
        );
        assert!(links.insert(&a, "docker.io/library/big"));
        assert!(links.insert(&b, "docker.io/library/big"));
        assert!(links.contains(&a, "docker.io", "library/small"));
        assert!(!links.contains(&b, "docker.io", "library/small"));
        assert!(
            !links.contains(&a, "docker.io", "library"),
            "whole names only"
        );

        let reopened = Links::open(&root, |_| true).unwrap();
        assert!(reopened.contains(&a, "docker.io", "library/small"));
        assert!(reopened.contains(&a, "docker.io", "library/big"));
        assert!(reopened.contains(&b, "docker.io", "library/big"));

        reopened.remove(&a);
        assert!(!reopened.contains(&a, "docker.io", "library/big"));
        let again = Links::open(&root, |_| true).unwrap();
        assert!(!again.contains(&a, "docker.io", "library/big"));

        // Content cached before links existed is served under any repository until it leaves.
        let old = digest(3);
        reopened.adopt_legacy(vec![old.clone()]).unwrap();
        assert!(reopened.contains(&old, "docker.io", "any/repository"));
        let again = Links::open(&root, |_| true).unwrap();
        assert!(again.contains(&old, "docker.io", "any/repository"));
        again.remove(&old);
        assert!(!again.contains(&old, "docker.io", "any/repository"));
        assert!(!Links::open(&root, |d| *d != old)
            .unwrap()
            .contains(&old, "docker.io", "x"));

        // A manifest's own link does not say its references are linked; that is recorded apart,
        // in memory only, and leaves with the manifest.
        let manifest = digest(4);
        again.insert(&manifest, "docker.io/library/big");
        assert!(!again.expanded(&manifest, "docker.io", "library/big"));
        again.mark_expanded(&manifest, "docker.io/library/big");
        assert!(again.expanded(&manifest, "docker.io", "library/big"));
        assert!(!again.expanded(&manifest, "docker.io", "library/small"));
        assert!(!Links::open(&root, |_| true).unwrap().expanded(
            &manifest,
            "docker.io",
            "library/big"
        ));
        again.remove(&manifest);
        assert!(!again.expanded(&manifest, "docker.io", "library/big"));

        // Links of content the store no longer holds are dropped at start-up, files and all.
        let pruned = Links::open(&root, |d| *d != b).unwrap();
        assert!(!pruned.contains(&b, "docker.io", "library/big"));
        assert!(!pruned.path(&b).exists());
    }
}
