//! Repository names and tags, validated by the OCI grammar.

use std::fmt;

use super::digest::Digest;
use super::error::{ErrorCode, OciError};

/// The longest repository name the reference grammar allows (host and path together).
const MAX_NAME_LEN: usize = 255;
/// Tags are at most 128 characters: one leading character and up to 127 more.
const MAX_TAG_LEN: usize = 128;

/// A repository name such as `library/alpine`: lowercase path components separated by `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(name: &str) -> Result<Self, OciError> {
        let invalid = |why: &str| {
            OciError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name: {why}"),
            )
        };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 255 characters"));
        }
        for component in name.split('/') {
            if !is_path_component(component) {
                return Err(invalid(
                    "components must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
                ));
            }
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker Hub keeps official images under `library/`: `alpine` is `library/alpine`.
    pub fn with_library_prefix(self) -> Self {
        if self.0.contains('/') {
            self
        } else {
            Self(format!("library/{}", self.0))
        }
    }

    /// Splits `first/rest` into the first component and the remaining name, if there is a rest.
    pub fn split_first(&self) -> Option<(&str, RepoName)> {
        let (first, rest) = self.0.split_once('/')?;
        Some((first, RepoName(rest.to_owned())))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        if expect_alnum {
            if !alnum(bytes[i]) {
                return false;
            }
            while i < bytes.len() && alnum(bytes[i]) {
                i += 1;
            }
            expect_alnum = false;
        } else {
            // A separator: `.`, `_`, `__` or one or more `-`.
            match bytes[i] {
                b'.' => i += 1,
                b'_' => {
                    i += 1;
                    if i < bytes.len() && bytes[i] == b'_' {
                        i += 1;
                    }
                }
                b'-' => {
                    while i < bytes.len() && bytes[i] == b'-' {
                        i += 1;
                    }
                }
                _ => return false,
            }
            expect_alnum = true;
        }
    }
    !bytes.is_empty() && !expect_alnum
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(tag: &str) -> Result<Self, OciError> {
        let bytes = tag.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let rest_ok = bytes
            .iter()
            .skip(1)
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || bytes.len() > MAX_TAG_LEN {
            return Err(OciError::new(
                ErrorCode::TagInvalid,
                "invalid tag: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}",
            ));
        }
        Ok(Self(tag.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows `/manifests/`: a tag, or a digest when it contains `:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(reference: &str) -> Result<Self, OciError> {
        if reference.contains(':') {
            Digest::parse(reference).map(Reference::Digest)
        } else {
            Tag::parse(reference).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => tag.fmt(f),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_grammar() {
        for good in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "a__b",
            "a.b",
            "a---b",
            "x9/y_z",
        ] {
            assert!(RepoName::parse(good).is_ok(), "{good} should be valid");
        }
        for bad in [
            "", "Alpine", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b", "..", "a/../b", "a b",
            "a%2fb",
        ] {
            let err = RepoName::parse(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::NameInvalid, "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn library_prefix_only_for_single_components() {
        let alpine = RepoName::parse("alpine").unwrap().with_library_prefix();
        assert_eq!(alpine.as_str(), "library/alpine");
        let owned = RepoName::parse("me/app").unwrap().with_library_prefix();
        assert_eq!(owned.as_str(), "me/app");
    }

    #[test]
    fn tags_follow_the_grammar() {
        for good in ["latest", "3.20", "_x", "v1-rc.2", &"a".repeat(128)] {
            assert!(Tag::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".x",
            "-x",
            "a/b",
            "a:b",
            &"a".repeat(129),
            &"a".repeat(300),
        ] {
            assert_eq!(
                Tag::parse(bad).unwrap_err().code,
                ErrorCode::TagInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        let digest = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(
            Reference::parse(&digest),
            Ok(Reference::Digest(_))
        ));
        assert_eq!(
            Reference::parse("sha256:xyz").unwrap_err().code,
            ErrorCode::DigestInvalid
        );
    }
}
