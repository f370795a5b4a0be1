//! What is cached: the listing of images and the inspection of one. Both read the store's
//! catalogue (tags → manifests → references with their sizes), which the pull path keeps as it
//! stores manifests, so listing a large cache reads no manifest file; inspecting one image reads
//! its stored manifests for their platforms.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Control, ControlError};
use crate::oci::manifest::ManifestDoc;
use crate::oci::{query_param, Digest, Reference};
use crate::store::{Catalogue, TagRecord};

/// `limit` when the caller gives none.
const DEFAULT_LIMIT: usize = 100;
/// The most images one page holds.
const MAX_LIMIT: usize = 1000;
/// Index children, and their references, followed at most this deep (an index of indexes).
const MAX_DEPTH: usize = 4;
/// Cursors name a position in the sorted listing; the prefix versions their form.
const CURSOR_PREFIX: &str = "o1.";

/// How the listing is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    /// registry, repository, tag.
    Name,
    /// Largest first.
    Size,
    /// Most pulled first.
    Pulls,
}

/// How often and when an image's manifest was last pulled.
#[derive(Clone, Copy, Debug, Default)]
struct Pulls {
    count: u64,
    last: Option<SystemTime>,
}

/// `GET /api/v1/images?registry=GLOB&repository=GLOB&sort=name|size|pulls&limit=N&cursor=C`.
pub(super) async fn list(control: &Control, query: Option<&str>) -> Result<Value, ControlError> {
    let registry_glob = query_param(query, "registry");
    let repository_glob = query_param(query, "repository");
    let sort = match query_param(query, "sort").as_deref() {
        None | Some("name") => Sort::Name,
        Some("size") => Sort::Size,
        Some("pulls") => Sort::Pulls,
        Some(other) => {
            return Err(ControlError::BadRequest(format!(
                "sort `{other}`: must be name, size or pulls"
            )))
        }
    };
    let limit = match query_param(query, "limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n.min(MAX_LIMIT),
            _ => {
                return Err(ControlError::BadRequest(format!(
                    "limit `{text}`: must be a number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let offset = match query_param(query, "cursor") {
        None => 0,
        Some(cursor) => parse_cursor(&cursor)
            .ok_or_else(|| ControlError::BadRequest(format!("cursor `{cursor}` is not valid")))?,
    };
    let catalogue = control.mirror.store().catalogue();
    let now = SystemTime::now();
    let mut images: Vec<(TagRecord, u64, Pulls)> = catalogue
        .tags()
        .into_iter()
        .filter(|tag| {
            registry_glob
                .as_deref()
                .is_none_or(|g| glob(g, &tag.registry))
        })
        .filter(|tag| {
            repository_glob
                .as_deref()
                .is_none_or(|g| glob(g, &tag.repository))
        })
        .map(|tag| {
            let size = image_size(catalogue, &tag.digest);
            let pulls = pulls_of(control, &tag.digest);
            (tag, size, pulls)
        })
        .collect();
    let by_name = |a: &TagRecord, b: &TagRecord| {
        (&a.registry, &a.repository, &a.tag).cmp(&(&b.registry, &b.repository, &b.tag))
    };
    match sort {
        Sort::Name => images.sort_by(|a, b| by_name(&a.0, &b.0)),
        Sort::Size => images.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| by_name(&a.0, &b.0))),
        Sort::Pulls => {
            images.sort_by(|a, b| b.2.count.cmp(&a.2.count).then_with(|| by_name(&a.0, &b.0)))
        }
    }
    let total = images.len();
    let page: Vec<Value> = images
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(tag, size, pulls)| {
            let last_pulled_seconds_ago = pulls
                .last
                .map(|last| now.duration_since(last).unwrap_or_default().as_secs());
            json!({
                "registry": tag.registry,
                "repository": tag.repository,
                "tag": tag.tag,
                "digest": tag.digest.to_string(),
                "media_type": tag.media_type,
                "size": size,
                "cached": catalogue.manifest(&tag.digest).is_some(),
                "pinned": is_pinned(control, &tag.digest),
                "pull_count": pulls.count,
                "last_pulled": pulls.last.map(rfc3339),
                "last_pulled_seconds_ago": last_pulled_seconds_ago,
                "recorded": rfc3339(tag.recorded),
            })
        })
        .collect();
    let next = offset + page.len();
    let next_cursor = (next < total).then(|| format!("{CURSOR_PREFIX}{next}"));
    Ok(json!({"images": page, "next_cursor": next_cursor}))
}

/// `GET /api/v1/images/inspect?image=REF`.
pub(super) async fn inspect(control: &Control, query: Option<&str>) -> Result<Value, ControlError> {
    let text = query_param(query, "image").ok_or_else(|| {
        ControlError::BadRequest("the `image` parameter is required (image=nginx:1.27)".to_owned())
    })?;
    let (target, reference) = control.resolve_image(&text)?;
    let registry = target.registry.upstream.name();
    let repository = target.repo.as_str();
    let store = control.mirror.store();
    let catalogue = store.catalogue();
    let (tag, digest, media_type) = match &reference {
        Reference::Tag(tag) => {
            let record = catalogue
                .tags_for(registry, repository)
                .into_iter()
                .find(|record| record.tag == tag.as_str())
                .ok_or_else(|| nothing_cached(&text))?;
            (Some(record.tag), record.digest, record.media_type)
        }
        Reference::Digest(digest) => {
            let record = catalogue
                .manifest(digest)
                .ok_or_else(|| nothing_cached(&text))?;
            (None, digest.clone(), record.media_type)
        }
    };
    let mut manifests = Vec::new();
    let mut seen = HashSet::new();
    describe(control, &digest, None, 0, &mut seen, &mut manifests).await;
    let image = match &tag {
        Some(tag) => format!("{registry}/{repository}:{tag}"),
        None => format!("{registry}/{repository}@{digest}"),
    };
    let pulls = pulls_of(control, &digest);
    Ok(json!({
        "image": image,
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest.to_string(),
        "media_type": media_type,
        "size": image_size(catalogue, &digest),
        "pinned": is_pinned(control, &digest),
        "pull_count": pulls.count,
        "last_pulled": pulls.last.map(rfc3339),
        "manifests": manifests,
    }))
}

fn nothing_cached(text: &str) -> ControlError {
    ControlError::NotFound(format!("nothing is cached under `{text}`"))
}

/// Blob `HEAD`s to the object tier at once, at most: an inspection of a large image stays quick
/// without a burst of hundreds of requests.
const TIER_HEADS: usize = 8;

/// Adds `"object_tier": true|false` to each blob when a tier is configured (`null` when the tier
/// did not answer: unknown, not absent).
async fn with_object_tier(control: &Control, blobs: Vec<Value>) -> Vec<Value> {
    use futures_util::StreamExt;
    let Some(tier) = control.object_tier.as_deref() else {
        return blobs;
    };
    futures_util::stream::iter(blobs)
        .map(|mut blob| async move {
            let held = match blob["digest"].as_str().map(Digest::parse) {
                Some(Ok(digest)) => tier.has_blob(&digest).await.ok(),
                _ => None,
            };
            blob["object_tier"] = json!(held);
            blob
        })
        .buffered(TIER_HEADS)
        .collect()
        .await
}

/// Appends the manifest `digest` (and, for an index, each child after it) to `out`: its media
/// type, size, platform (as its index names it), whether it is cached, and its blobs with where
/// each is held.
async fn describe(
    control: &Control,
    digest: &Digest,
    platform: Option<Value>,
    depth: usize,
    seen: &mut HashSet<Digest>,
    out: &mut Vec<Value>,
) {
    if !seen.insert(digest.clone()) {
        return;
    }
    let store = control.mirror.store();
    let stored = store.read_manifest(digest).await;
    let record = store.catalogue().manifest(digest);
    let doc = stored
        .as_ref()
        .and_then(|stored| ManifestDoc::parse(&stored.bytes).ok())
        .unwrap_or_default();
    let blobs: Vec<Value> = doc
        .config
        .iter()
        .chain(&doc.layers)
        .chain(&doc.blobs)
        .filter_map(|descriptor| {
            Digest::parse(&descriptor.digest)
                .ok()
                .map(|d| (d, descriptor.size))
        })
        .map(|(blob, size)| {
            json!({
                "digest": blob.to_string(),
                "size": size,
                "local": store.contains_blob(&blob),
            })
        })
        .collect();
    let blobs = with_object_tier(control, blobs).await;
    let children: Vec<(Digest, Value)> =
        doc.manifests
            .iter()
            .filter_map(|child| {
                let digest = Digest::parse(&child.digest).ok()?;
                let platform = child.platform.as_ref().map(
                    |p| json!({"os": p.os, "architecture": p.architecture, "variant": p.variant}),
                );
                Some((digest, platform.unwrap_or(Value::Null)))
            })
            .collect();
    let platforms: Vec<Value> = children
        .iter()
        .map(|(child, platform)| {
            json!({
                "digest": child.to_string(),
                "platform": platform,
                "cached": store.catalogue().manifest(child).is_some(),
            })
        })
        .collect();
    out.push(json!({
        "digest": digest.to_string(),
        "media_type": stored.as_ref().map(|s| s.media_type.clone()).or(record.as_ref().map(|r| r.media_type.clone())),
        "size": record.as_ref().map(|r| r.size),
        "cached": stored.is_some(),
        "platform": platform,
        "platforms": platforms,
        "blobs": blobs,
    }));
    if depth >= MAX_DEPTH {
        return;
    }
    for (child, platform) in children {
        Box::pin(describe(
            control,
            &child,
            Some(platform),
            depth + 1,
            seen,
            out,
        ))
        .await;
    }
}

/// The manifest plus every digest it references, children of an index (and their references)
/// included, each digest counted once. A child not cached counts with the size its index
/// declares.
fn image_size(catalogue: &Catalogue, digest: &Digest) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut pending = vec![(digest.clone(), None, 0)];
    while let Some((digest, declared, depth)) = pending.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        match catalogue.manifest(&digest) {
            Some(record) if depth <= MAX_DEPTH => {
                total += record.size;
                pending.extend(
                    record
                        .references
                        .into_iter()
                        .map(|(child, size)| (child, Some(size), depth + 1)),
                );
            }
            _ => total += declared.unwrap_or(0),
        }
    }
    total
}

/// How often and when `digest` was last pulled (manifest `GET`s, counted by the catalogue).
fn pulls_of(control: &Control, digest: &Digest) -> Pulls {
    match control.mirror.store().catalogue().pulls(digest) {
        Some(record) => Pulls {
            count: record.count,
            last: Some(record.last),
        },
        None => Pulls::default(),
    }
}

fn is_pinned(control: &Control, digest: &Digest) -> bool {
    control.mirror.store().pins().contains(digest)
}

fn parse_cursor(cursor: &str) -> Option<usize> {
    cursor.strip_prefix(CURSOR_PREFIX)?.parse().ok()
}

/// Whether `text` matches `pattern`, where `*` is any run of characters (`/` included, so
/// `library/*` holds every repository under it) and `?` is one character.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it has consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if *c == '?' || *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// `2026-12-03T17:00:00Z`: UTC, whole seconds.
pub(super) fn rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shells_do() {
        assert!(glob("library/*", "library/alpine"));
        assert!(glob("*", "ghcr.io"));
        assert!(glob("docker.io", "docker.io"));
        assert!(glob("*.example.com", "registry.example.com"));
        assert!(glob("test/mult?", "test/multi"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("library/*", "other/alpine"));
        assert!(!glob("test/mult?", "test/mult"));
        assert!(!glob("docker.io", "docker.iox"));
        assert!(!glob("nothing-*", "test/multi"));
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let time = UNIX_EPOCH + Duration::from_secs(1_796_317_200);
        assert_eq!(rfc3339(time), "2026-12-03T17:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor("o1.100"), Some(100));
        assert_eq!(parse_cursor("100"), None);
        assert_eq!(parse_cursor("o1.x"), None);
    }
}
