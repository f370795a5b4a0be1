//! Image references as users write them (`alpine:3.20`, `ghcr.io/owner/app:v1`,
//! `redis@sha256:…`), split the way docker splits them: a first component that looks like a host
//! names the registry, Docker Hub's own names mean the default one.

use super::host;

/// An image reference as users write it: `alpine:3.20`, `ghcr.io/owner/app@sha256:…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The mirror path prefix: `""` for Docker Hub, `"ghcr.io/"` for another registry.
    pub prefix: String,
    pub repository: String,
    pub reference: String,
}

impl ImageRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, reference) = match text.split_once('@') {
            Some((name, digest)) => (name, digest.to_owned()),
            None => match text.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, tag.to_owned()),
                _ => (text, "latest".to_owned()),
            },
        };
        let (prefix, repository) = match name.split_once('/') {
            Some((first, rest)) if host::looks_like_host(first) => {
                if host::is_docker_hub(first) {
                    (String::new(), rest.to_owned())
                } else {
                    (format!("{first}/"), rest.to_owned())
                }
            }
            _ => (String::new(), name.to_owned()),
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(format!("`{text}` is not an image reference"));
        }
        Ok(Self {
            prefix,
            repository,
            reference,
        })
    }

    /// The mirror's path for `kind` (`manifests`, `blobs`) of this image at `reference`.
    pub fn path(&self, kind: &str, reference: &str) -> String {
        format!("/v2/{}{}/{kind}/{reference}", self.prefix, self.repository)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references_like_docker_does() {
        let parsed = ImageRef::parse("alpine").unwrap();
        assert_eq!(
            (
                parsed.prefix.as_str(),
                parsed.repository.as_str(),
                parsed.reference.as_str()
            ),
            ("", "alpine", "latest")
        );
        let parsed = ImageRef::parse("ghcr.io/owner/app:v1").unwrap();
        assert_eq!(
            parsed.path("manifests", "v1"),
            "/v2/ghcr.io/owner/app/manifests/v1"
        );
        let parsed = ImageRef::parse("localhost:5000/team/app").unwrap();
        assert_eq!(
            (parsed.prefix.as_str(), parsed.reference.as_str()),
            ("localhost:5000/", "latest")
        );
        let parsed = ImageRef::parse("docker.io/library/redis@sha256:abc").unwrap();
        assert_eq!(
            (
                parsed.prefix.as_str(),
                parsed.repository.as_str(),
                parsed.reference.as_str()
            ),
            ("", "library/redis", "sha256:abc")
        );
        assert!(ImageRef::parse("").is_err());
    }
}
