//! `gantry ls`, `gantry inspect`, `gantry stats`: reading what the cache holds. Each asks the
//! admin API once and prints its JSON (`--json`) or a table; an API error's message goes to
//! stderr and the exit code is 1.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::Value;

use super::{human_age, human_size, print_json, run, AdminArgs, AdminClient, CtlError, Table};

/// `gantry ls`: filters are globs over registry and repository (`docker.io`, `library/*`).
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub registry: Option<String>,
    pub repository: Option<String>,
    pub limit: Option<usize>,
}

pub fn ls(args: &AdminArgs, filter: &ListFilter) -> ExitCode {
    let mut query = Vec::new();
    if let Some(registry) = &filter.registry {
        query.push(format!("registry={}", encode(registry)));
    }
    if let Some(repository) = &filter.repository {
        query.push(format!("repository={}", encode(repository)));
    }
    if let Some(limit) = filter.limit {
        query.push(format!("limit={limit}"));
    }
    let path = if query.is_empty() {
        "/api/v1/images".to_owned()
    } else {
        format!("/api/v1/images?{}", query.join("&"))
    };
    command("ls", args, &path, render_images)
}

pub fn inspect(args: &AdminArgs, image: &str) -> ExitCode {
    let path = format!("/api/v1/images/inspect?image={}", encode(image));
    command("inspect", args, &path, render_inspect)
}

pub fn stats(args: &AdminArgs) -> ExitCode {
    command("stats", args, "/api/v1/stats", render_stats)
}

/// One GET, then `--json` or `render`; the API's message and exit 1 on any failure.
fn command(name: &str, args: &AdminArgs, path: &str, render: fn(&Value) -> String) -> ExitCode {
    let path = path.to_owned();
    let answer = run(async move {
        let result: Result<Value, CtlError> = async {
            let client = AdminClient::new(args)?;
            client.get(&path).await
        }
        .await;
        match result {
            Ok(value) => {
                if args.json {
                    print_json(&value);
                } else {
                    print!("{}", render(&value));
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("gantry {name}: {error}");
                ExitCode::FAILURE
            }
        }
    });
    answer
}

fn render_images(value: &Value) -> String {
    let mut table = Table::new(&["IMAGE", "DIGEST", "SIZE", "PULLS", "LAST PULLED", "PINNED"]);
    for image in value["images"].as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}:{}",
            text(&image["registry"]),
            text(&image["repository"]),
            text(&image["tag"])
        );
        let last_pulled = image["last_pulled_seconds_ago"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |s| format!("{} ago", human_age(s)));
        table.row(vec![
            name,
            short_digest(text(&image["digest"])),
            human_size(image["size"].as_u64().unwrap_or(0)),
            image["pull_count"].as_u64().unwrap_or(0).to_string(),
            last_pulled,
            yes_no(image["pinned"].as_bool()),
        ]);
    }
    let mut out = table.render();
    if value["next_cursor"].is_string() {
        out.push_str("(more images: raise --limit, or page the API with its cursor)\n");
    }
    out
}

fn render_inspect(value: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", text(&value["image"]));
    let _ = writeln!(out, "  digest:     {}", text(&value["digest"]));
    let _ = writeln!(out, "  media type: {}", text(&value["media_type"]));
    let _ = writeln!(
        out,
        "  size:       {}",
        human_size(value["size"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(out, "  pinned:     {}", yes_no(value["pinned"].as_bool()));
    for manifest in value["manifests"].as_array().into_iter().flatten() {
        let platform = platform_name(&manifest["platform"]);
        let _ = writeln!(
            out,
            "  manifest {}{}{}",
            short_digest(text(&manifest["digest"])),
            platform.map(|p| format!(" ({p})")).unwrap_or_default(),
            if manifest["cached"].as_bool() == Some(true) {
                ""
            } else {
                " [not cached]"
            }
        );
        for child in manifest["platforms"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "    platform {:<16} {}{}",
                platform_name(&child["platform"]).unwrap_or_else(|| "-".to_owned()),
                short_digest(text(&child["digest"])),
                if child["cached"].as_bool() == Some(true) {
                    ""
                } else {
                    " [not cached]"
                }
            );
        }
        for blob in manifest["blobs"].as_array().into_iter().flatten() {
            let mut places = Vec::new();
            if blob["local"].as_bool() == Some(true) {
                places.push("local");
            }
            if blob["object_tier"].as_bool() == Some(true) {
                places.push("object tier");
            }
            let _ = writeln!(
                out,
                "    blob {}  {:>9}  {}",
                short_digest(text(&blob["digest"])),
                human_size(blob["size"].as_u64().unwrap_or(0)),
                if places.is_empty() {
                    "not held".to_owned()
                } else {
                    places.join(", ")
                }
            );
        }
    }
    out
}

fn render_stats(value: &Value) -> String {
    let mut out = String::new();
    let lookups = &value["lookups"];
    let bytes = &value["bytes"];
    let _ = writeln!(
        out,
        "hit ratio:    {} ({} hits, {} misses)",
        percent(&lookups["hit_ratio"]),
        lookups["hits"].as_u64().unwrap_or(0),
        lookups["misses"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "bytes saved:  {} ({} from cache, {} from upstream)",
        percent(&bytes["saved_ratio"]),
        human_size(bytes["from_cache"].as_u64().unwrap_or(0)),
        human_size(bytes["from_upstream"].as_u64().unwrap_or(0))
    );
    let store = &value["store"];
    let _ = writeln!(
        out,
        "store:        {} in {} entries{}, {} pinned",
        human_size(store["bytes"].as_u64().unwrap_or(0)),
        store["entries"].as_u64().unwrap_or(0),
        store["max_size"]
            .as_u64()
            .map(|max| format!(" of {}", human_size(max)))
            .unwrap_or_default(),
        human_size(store["pinned_bytes"].as_u64().unwrap_or(0))
    );
    if let Some(tier) = value["object_tier"].as_object() {
        let state = if tier.get("up").and_then(Value::as_bool) == Some(true) {
            "up".to_owned()
        } else {
            format!(
                "down ({})",
                tier.get("last_error")
                    .and_then(Value::as_str)
                    .unwrap_or("no answer yet")
            )
        };
        let _ = writeln!(out, "object tier:  {state}");
    }
    let _ = writeln!(
        out,
        "uptime:       {}",
        human_age(value["uptime_seconds"].as_u64().unwrap_or(0))
    );
    out.push('\n');
    let mut registries = Table::new(&[
        "REGISTRY",
        "HIT RATIO",
        "FROM CACHE",
        "FROM UPSTREAM",
        "ERRORS",
        "RATE LIMIT",
    ]);
    for registry in value["registries"].as_array().into_iter().flatten() {
        let limit = &registry["rate_limit"];
        let rate_limit = match (limit["remaining"].as_u64(), limit["limit"].as_u64()) {
            (Some(remaining), Some(limit_value)) => format!(
                "{remaining}/{limit_value}{}",
                limit["window_seconds"]
                    .as_u64()
                    .map(|w| format!(" per {}", human_age(w)))
                    .unwrap_or_default()
            ),
            _ => "-".to_owned(),
        };
        registries.row(vec![
            text(&registry["registry"]).to_owned(),
            percent(&registry["hit_ratio"]),
            human_size(registry["bytes_from_cache"].as_u64().unwrap_or(0)),
            human_size(registry["bytes_from_upstream"].as_u64().unwrap_or(0)),
            registry["upstream_errors"]
                .as_u64()
                .unwrap_or(0)
                .to_string(),
            rate_limit,
        ]);
    }
    out.push_str(&registries.render());
    let downloads = value["downloads"].as_array().cloned().unwrap_or_default();
    if downloads.is_empty() {
        out.push_str("\nno downloads in flight\n");
    } else {
        out.push('\n');
        let mut table = Table::new(&["DOWNLOAD", "RECEIVED", "SIZE", "FOR"]);
        for download in &downloads {
            table.row(vec![
                short_digest(text(&download["digest"])),
                human_size(download["received"].as_u64().unwrap_or(0)),
                download["size"]
                    .as_u64()
                    .map_or_else(|| "?".to_owned(), human_size),
                human_age(download["seconds"].as_u64().unwrap_or(0)),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

fn yes_no(value: Option<bool>) -> String {
    if value == Some(true) { "yes" } else { "no" }.to_owned()
}

/// `0.93` as `93.0%`; `-` before anything was counted.
fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |ratio| format!("{:.1}%", ratio * 100.0))
}

/// `sha256:0123456789ab`: the algorithm and 12 hex digits, as `docker images` shortens IDs.
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) => format!("{algorithm}:{}", &hex[..hex.len().min(12)]),
        None => digest.to_owned(),
    }
}

/// `linux/arm64/v8` from an index's platform object.
fn platform_name(platform: &Value) -> Option<String> {
    let os = platform["os"].as_str()?;
    let architecture = platform["architecture"].as_str()?;
    Some(match platform["variant"].as_str() {
        Some(variant) => format!("{os}/{architecture}/{variant}"),
        None => format!("{os}/{architecture}"),
    })
}

/// Percent-encodes a query value (globs and references keep `*`, `/`, `:` and `@` readable).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~*/:@".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_images_as_a_table() {
        let value = serde_json::json!({"images": [{
            "registry": "docker.io", "repository": "library/alpine", "tag": "3.20",
            "digest": "sha256:0123456789abcdef0123", "size": 3_620_000, "pull_count": 4,
            "last_pulled_seconds_ago": 300, "pinned": true
        }], "next_cursor": null});
        assert_eq!(
            render_images(&value),
            "IMAGE                          DIGEST               SIZE    PULLS  LAST PULLED  PINNED\n\
             docker.io/library/alpine:3.20  sha256:0123456789ab  3.62MB  4      5m ago       yes\n"
        );
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("library/*"), "library/*");
        assert_eq!(encode("a b&c?d#e+f%"), "a%20b%26c%3Fd%23e%2Bf%25");
        assert_eq!(percent(&serde_json::json!(0.935)), "93.5%");
        assert_eq!(percent(&Value::Null), "-");
    }
}
