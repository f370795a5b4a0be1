//! `tag_rules`: how long a cached tag is trusted, by tag name (`mirroring.tag_rules`, and
//! `registries[].tag_rules`, which replaces the global list for that registry).
//!
//! One TTL for every tag is wrong at both ends: `latest` moves daily and is worth a `HEAD` per
//! minute, while `v1.2.3` never moves and a revalidation of it only spends the upstream's rate
//! limit. Rules are tried in order, the first whose glob matches the tag wins, and a tag no rule
//! matches lives `tags_cache_ttl`.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::values::{Seconds, Text};

/// The longest pattern [`crate::access::glob`] matches at all.
const MAX_PATTERN_LEN: usize = 256;

/// One `{match: GLOB, ttl: DURATION | forever}` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagRule {
    /// A glob over the tag: `*` any run of characters, `?` one character.
    #[serde(rename = "match")]
    pub pattern: Text,
    pub ttl: TagTtl,
}

/// How long a cached tag is answered without asking the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagTtl {
    For(Duration),
    /// Never revalidated once cached: only a refresh or a purge changes what the tag names.
    Forever,
}

impl TagTtl {
    /// Whether an entry confirmed `age` ago is still answered without the upstream.
    pub fn fresh(self, age: Duration) -> bool {
        match self {
            Self::For(ttl) => age < ttl,
            Self::Forever => true,
        }
    }
}

impl fmt::Display for TagTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::For(ttl) => Seconds(*ttl).fmt(f),
            Self::Forever => f.write_str("forever"),
        }
    }
}

impl Serialize for TagTtl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TagTtl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(deserializer)?.0;
        if text.trim() == "forever" {
            return Ok(Self::Forever);
        }
        Seconds::parse(&text)
            .map(|seconds| Self::For(seconds.0))
            .map_err(|message| de::Error::custom(format!("{message}, or `forever`")))
    }
}

/// The TTL of `tag` under `rules`, `default` when none matches.
pub fn tag_ttl(rules: &[TagRule], tag: &str, default: Duration) -> TagTtl {
    rules
        .iter()
        .find(|rule| crate::access::glob(&rule.pattern.0, tag))
        .map_or(TagTtl::For(default), |rule| rule.ttl)
}

/// Every problem of a rule list, each naming its key (`key` is e.g. `mirroring.tag_rules`).
pub(super) fn problems(key: &str, rules: &[TagRule], problems: &mut Vec<String>) {
    for (index, rule) in rules.iter().enumerate() {
        let pattern = &rule.pattern.0;
        let key = format!("{key}[{index}].match");
        if pattern.is_empty() {
            problems.push(format!("{key}: must not be empty (`*` matches every tag)"));
        } else if pattern.len() > MAX_PATTERN_LEN {
            problems.push(format!(
                "{key}: longer than {MAX_PATTERN_LEN} characters, so it matches no tag"
            ));
        } else if let Some(bad) = pattern
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '*' | '?')))
        {
            problems.push(format!(
                "{key}: `{pattern}` has `{bad}`, which no tag contains (tags are letters, digits, `_`, `.` and `-`)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, ttl: TagTtl) -> TagRule {
        TagRule {
            pattern: Text(pattern.into()),
            ttl,
        }
    }

    #[test]
    fn the_first_matching_rule_wins_and_no_match_is_the_default() {
        let minute = TagTtl::For(Duration::from_secs(60));
        let rules = [
            rule("latest", minute),
            rule("v*", TagTtl::Forever),
            rule("*", TagTtl::For(Duration::ZERO)),
        ];
        let default = Duration::from_secs(600);
        assert_eq!(tag_ttl(&rules, "latest", default), minute);
        assert_eq!(tag_ttl(&rules, "v1.2.3", default), TagTtl::Forever);
        assert_eq!(
            tag_ttl(&rules, "nightly", default),
            TagTtl::For(Duration::ZERO)
        );
        assert_eq!(
            tag_ttl(&rules[..2], "nightly", default),
            TagTtl::For(default)
        );
        assert!(TagTtl::Forever.fresh(Duration::from_secs(u32::MAX.into())));
        assert!(!minute.fresh(Duration::from_secs(60)));
    }
}
