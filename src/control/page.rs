//! The status page at the admin listener's `/`: server-rendered HTML from the API's own answers.
//!
//! It calls the very functions the JSON routes call (`stats`, `inventory::list`, `history`) and
//! renders from their JSON, so the page can never show what the API would not; a source that
//! errs turns its panels into "not available" and the rest still render. No script: the chart is
//! SVG drawn here from the history ring, and a meta refresh keeps the page live. Every string
//! from the JSON is escaped, since image names come from clients.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::{history, inventory, stats, Control};
use crate::human::{human_age, human_size};

const STYLE: &str = include_str!("page.css");
/// Seconds between the browser's reloads of the page.
const REFRESH_SECONDS: u32 = 10;
/// Rows in each of the images tables.
const TOP: usize = 10;
/// The chart's drawing size in SVG units (it scales to the panel's width).
const CHART_WIDTH: f64 = 720.0;
const CHART_HEIGHT: f64 = 120.0;

pub(super) async fn page(control: &Control) -> Response<Full<Bytes>> {
    let sources = Sources {
        stats: stats::stats(control).await.map_err(|e| e.to_string()),
        largest: inventory::list(control, Some("sort=size&limit=10"))
            .await
            .map_err(|e| e.to_string()),
        most_pulled: inventory::list(control, Some("sort=pulls&limit=10"))
            .await
            .map_err(|e| e.to_string()),
        history: history::history(control).await.map_err(|e| e.to_string()),
    };
    super::respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from(render(&sources)),
    )
}

/// What the page renders from: each API answer, or why it is not available.
struct Sources {
    stats: Result<Value, String>,
    largest: Result<Value, String>,
    most_pulled: Result<Value, String>,
    history: Result<Value, String>,
}

fn render(sources: &Sources) -> String {
    let mut html = String::with_capacity(16 << 10);
    let uptime = sources
        .stats
        .as_ref()
        .ok()
        .and_then(|stats| stats["uptime_seconds"].as_u64())
        .map(|seconds| format!("up {}", human_age(seconds)))
        .unwrap_or_default();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>gantry status</title><style>{STYLE}</style></head><body>\
         <header><h1>gantry</h1><span class=\"muted\" id=\"uptime\">{}</span></header><main>",
        escape(&uptime)
    );
    summary(&mut html, &sources.stats);
    chart(&mut html, &sources.history);
    downloads(&mut html, &sources.stats);
    images(&mut html, &sources.largest, &sources.most_pulled);
    registries(&mut html, &sources.stats);
    store(&mut html, &sources.stats);
    html.push_str("</main></body></html>\n");
    html
}

/// `<section class="panel" id=ID><h2>TITLE</h2>` … `</section>`, or "not available" in it.
fn panel(
    html: &mut String,
    id: &str,
    title: &str,
    class: &str,
    source: &Result<Value, String>,
    body: impl FnOnce(&mut String, &Value),
) {
    let _ = write!(
        html,
        "<section class=\"panel {class}\" id=\"{id}\"><h2>{title}</h2>"
    );
    match source {
        Ok(value) => body(html, value),
        Err(error) => unavailable(html, error),
    }
    html.push_str("</section>");
}

fn unavailable(html: &mut String, error: &str) {
    let _ = write!(
        html,
        "<p class=\"unavailable\">not available: {}</p>",
        escape(error)
    );
}

fn summary(html: &mut String, stats: &Result<Value, String>) {
    panel(html, "summary", "Cache", "", stats, |html, stats| {
        let lookups = &stats["lookups"];
        let bytes = &stats["bytes"];
        let hits = lookups["hits"].as_u64().unwrap_or(0);
        let misses = lookups["misses"].as_u64().unwrap_or(0);
        let from_cache = bytes["from_cache"].as_u64().unwrap_or(0);
        let from_upstream = bytes["from_upstream"].as_u64().unwrap_or(0);
        let _ = write!(
            html,
            "<div class=\"figures\">\
             <div class=\"figure\"><span class=\"value\" id=\"hit-ratio\">{}</span>\
             <span class=\"label\">hit ratio ({hits} hits, {misses} misses)</span></div>\
             <div class=\"figure\"><span class=\"value\" id=\"bytes-saved\">{}</span>\
             <span class=\"label\">served from cache: {} of {} (<span id=\"saved-ratio\">{}</span>)</span></div>\
             </div>",
            percent(&lookups["hit_ratio"]),
            human_size(from_cache),
            human_size(from_cache),
            human_size(from_cache.saturating_add(from_upstream)),
            percent(&bytes["saved_ratio"]),
        );
    });
}

fn chart(html: &mut String, history: &Result<Value, String>) {
    panel(
        html,
        "history",
        "The last hour",
        "wide",
        history,
        |html, history| {
            let interval = history["interval_seconds"].as_u64().unwrap_or(10).max(1);
            let empty = Vec::new();
            let points = history["points"].as_array().unwrap_or(&empty);
            let field = |point: &Value, key: &str| point[key].as_u64().unwrap_or(0) as f64;
            let bars: Vec<Bar> = points
                .iter()
                .map(|point| Bar {
                    t: point["t"].as_u64().unwrap_or(0),
                    requests: field(point, "requests"),
                    cache: field(point, "bytes_from_cache"),
                    upstream: field(point, "bytes_from_upstream"),
                })
                .collect();
            let end = bars.iter().map(|bar| bar.t).max().unwrap_or(0);
            let span = interval * history::POINTS as u64;
            let _ = write!(
                html,
                "<h3>Requests per {interval} s</h3><div class=\"legend\"><span class=\"requests\">requests</span></div>"
            );
            let max_requests = bars.iter().map(|bar| bar.requests).fold(0.0, f64::max);
            svg(
                html,
                "requests-chart",
                &format!("max {max_requests} requests per {interval} s"),
                &bars,
                end,
                span,
                max_requests,
                |bar| vec![("requests", bar.requests)],
            );
            let _ = write!(
                html,
                "<h3>Bytes served per {interval} s</h3><div class=\"legend\">\
                 <span class=\"cache\">from cache</span><span class=\"upstream\">from upstream</span></div>"
            );
            let max_bytes = bars
                .iter()
                .map(|bar| bar.cache + bar.upstream)
                .fold(0.0, f64::max);
            svg(
                html,
                "bytes-chart",
                &format!("max {} per {interval} s", human_size(max_bytes as u64)),
                &bars,
                end,
                span,
                max_bytes,
                |bar| vec![("cache", bar.cache), ("upstream", bar.upstream)],
            );
            if bars.is_empty() {
                html.push_str("<p class=\"muted\">No samples yet: the first point appears after one interval.</p>");
            }
        },
    );
}

/// One point of the history, as the chart draws it.
struct Bar {
    t: u64,
    requests: f64,
    cache: f64,
    upstream: f64,
}

/// An SVG bar chart of `bars` over the `span` seconds that end at `end`, each bar the stack of
/// `stack(bar)`'s (class, value) from the bottom, scaled so `max` fills the height.
#[allow(clippy::too_many_arguments)]
fn svg(
    html: &mut String,
    id: &str,
    caption: &str,
    bars: &[Bar],
    end: u64,
    span: u64,
    max: f64,
    stack: impl Fn(&Bar) -> Vec<(&'static str, f64)>,
) {
    let width = (CHART_WIDTH / history::POINTS as f64).max(1.0);
    let _ = write!(
        html,
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{}\">",
        escape(caption)
    );
    for bar in bars {
        let age = end.saturating_sub(bar.t) as f64;
        let x = CHART_WIDTH - width - age / span.max(1) as f64 * CHART_WIDTH;
        if x < 0.0 {
            continue;
        }
        let mut bottom = CHART_HEIGHT;
        for (class, value) in stack(bar) {
            if value <= 0.0 || max <= 0.0 {
                continue;
            }
            let height = value / max * CHART_HEIGHT;
            bottom -= height;
            let _ = write!(
                html,
                "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{bottom:.1}\" width=\"{width:.1}\" height=\"{height:.1}\"/>"
            );
        }
    }
    // The labels are HTML below the drawing: the SVG stretches to the panel's width and would
    // stretch text with it.
    let _ = write!(
        html,
        "</svg><div class=\"axis\"><span>{}</span><span>1 h ago … now</span></div>",
        escape(caption)
    );
}

fn downloads(html: &mut String, stats: &Result<Value, String>) {
    panel(
        html,
        "downloads",
        "Downloads in flight",
        "",
        stats,
        |html, stats| {
            let empty = Vec::new();
            let downloads = stats["downloads"].as_array().unwrap_or(&empty);
            if downloads.is_empty() {
                html.push_str("<p class=\"muted\">No downloads in flight.</p>");
                return;
            }
            html.push_str("<table id=\"downloads-table\"><tr><th>blob</th><th>progress</th><th class=\"num\">received</th><th class=\"num\">for</th></tr>");
            for download in downloads {
                let digest = download["digest"].as_str().unwrap_or("");
                let received = download["received"].as_u64().unwrap_or(0);
                let size = download["size"].as_u64();
                let progress = match size {
                    Some(size) => {
                        format!("<progress value=\"{received}\" max=\"{size}\"></progress>")
                    }
                    None => "<progress></progress>".to_owned(),
                };
                let of = size
                    .map(|size| format!(" of {}", human_size(size)))
                    .unwrap_or_default();
                let _ = write!(
                html,
                "<tr class=\"download\"><td class=\"name\" title=\"{}\">{}</td><td>{progress}</td>\
                 <td class=\"num\">{}{of}</td><td class=\"num\">{}</td></tr>",
                escape(digest),
                escape(short_digest(digest)),
                human_size(received),
                human_age(download["seconds"].as_u64().unwrap_or(0)),
            );
            }
            html.push_str("</table>");
        },
    );
}

fn images(html: &mut String, largest: &Result<Value, String>, most_pulled: &Result<Value, String>) {
    html.push_str("<section class=\"panel wide\" id=\"images\"><h2>Images</h2>");
    images_table(html, "largest-images", "Largest", largest, |a, b| {
        b["size"].as_u64().cmp(&a["size"].as_u64())
    });
    images_table(
        html,
        "most-pulled-images",
        "Most pulled",
        most_pulled,
        |a, b| b["pull_count"].as_u64().cmp(&a["pull_count"].as_u64()),
    );
    html.push_str("</section>");
}

/// A top-[`TOP`] table of a listing, ordered by `order` here too (the listing is asked for in
/// that order; sorting again costs nothing and keeps the table right whatever the listing did).
fn images_table(
    html: &mut String,
    id: &str,
    title: &str,
    listing: &Result<Value, String>,
    order: impl Fn(&Value, &Value) -> std::cmp::Ordering,
) {
    let _ = write!(html, "<h3>{title}</h3>");
    let listing = match listing {
        Ok(listing) => listing,
        Err(error) => return unavailable(html, error),
    };
    let mut rows: Vec<&Value> = listing["images"]
        .as_array()
        .map(|images| images.iter().collect())
        .unwrap_or_default();
    if rows.is_empty() {
        html.push_str("<p class=\"muted\">Nothing cached yet.</p>");
        return;
    }
    rows.sort_by(|a, b| order(a, b));
    let _ = write!(
        html,
        "<table id=\"{id}\"><tr><th>image</th><th class=\"num\">size</th><th class=\"num\">pulls</th>\
         <th class=\"num\">last pulled</th><th>pinned</th></tr>"
    );
    for image in rows.into_iter().take(TOP) {
        let text = |key: &str| image[key].as_str().unwrap_or("");
        let mut name = format!("{}/{}", text("registry"), text("repository"));
        if !text("tag").is_empty() {
            let _ = write!(name, ":{}", text("tag"));
        }
        let last = image["last_pulled_seconds_ago"]
            .as_u64()
            .map(|seconds| format!("{} ago", human_age(seconds)))
            .unwrap_or_else(|| "never".to_owned());
        let _ = write!(
            html,
            "<tr class=\"image\"><td class=\"name\" title=\"{}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            escape(text("digest")),
            escape(&name),
            human_size(image["size"].as_u64().unwrap_or(0)),
            image["pull_count"].as_u64().unwrap_or(0),
            escape(&last),
            if image["pinned"].as_bool() == Some(true) {
                "pinned"
            } else {
                ""
            },
        );
    }
    html.push_str("</table>");
}

fn registries(html: &mut String, stats: &Result<Value, String>) {
    panel(
        html,
        "registries",
        "Upstreams",
        "wide",
        stats,
        |html, stats| {
            let empty = Vec::new();
            let registries = stats["registries"].as_array().unwrap_or(&empty);
            if registries.is_empty() {
                html.push_str("<p class=\"muted\">No upstream asked yet.</p>");
                return;
            }
            html.push_str(
            "<table id=\"registries-table\"><tr><th>registry</th><th class=\"num\">hit ratio</th>\
             <th class=\"num\">from cache</th><th class=\"num\">from upstream</th>\
             <th class=\"num\">upstream errors</th><th>rate limit headroom</th></tr>",
        );
            for registry in registries {
                let errors = registry["upstream_errors"].as_u64().unwrap_or(0);
                let _ = write!(
                html,
                "<tr class=\"registry\"><td class=\"name\">{}{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num{}\">{errors}</td><td>{}{}</td></tr>",
                escape(registry["registry"].as_str().unwrap_or("")),
                if registry["offline"].as_bool() == Some(true) {
                    " <strong class=\"offline\">offline</strong>"
                } else {
                    ""
                },
                percent(&registry["hit_ratio"]),
                human_size(registry["bytes_from_cache"].as_u64().unwrap_or(0)),
                human_size(registry["bytes_from_upstream"].as_u64().unwrap_or(0)),
                if errors > 0 { " bad" } else { "" },
                rate_limit(&registry["rate_limit"]),
                budget(&registry["budget"]),
            );
            }
            html.push_str("</table>");
        },
    );
}

/// What the rate-limit budget does now: nothing, sparing cached tags, or holding off after a 429.
fn budget(budget: &Value) -> String {
    if let Some(seconds) = budget["held_off_seconds"].as_u64() {
        return format!(
            "<br><span class=\"bad\">answered 429: manifest requests held off for {}</span>",
            human_age(seconds)
        );
    }
    if budget["at_reserve"].as_bool() == Some(true) {
        return format!(
            "<br><span class=\"bad\">at the reserve ({}): cached tags served without revalidation</span>",
            escape(budget["reserve"].as_str().unwrap_or(""))
        );
    }
    String::new()
}

fn rate_limit(limit: &Value) -> String {
    let (Some(max), Some(remaining)) = (limit["limit"].as_u64(), limit["remaining"].as_u64())
    else {
        return "<span class=\"muted\">not reported</span>".to_owned();
    };
    let window = limit["window_seconds"]
        .as_u64()
        .map(|seconds| format!(" per {}", human_age(seconds)))
        .unwrap_or_default();
    let seen = limit["observed_seconds_ago"]
        .as_u64()
        .map(|seconds| format!(", seen {} ago", human_age(seconds)))
        .unwrap_or_default();
    format!(
        "<progress class=\"headroom\" value=\"{remaining}\" max=\"{max}\"></progress> \
         {remaining} of {max} left{window}{seen}"
    )
}

fn store(html: &mut String, stats: &Result<Value, String>) {
    panel(html, "store", "Store", "", stats, |html, stats| {
        let store = &stats["store"];
        let bytes = store["bytes"].as_u64().unwrap_or(0);
        let usage = match store["max_size"].as_u64() {
            Some(max) => format!(
                "<progress id=\"store-usage\" value=\"{bytes}\" max=\"{max}\"></progress> {} of {}",
                human_size(bytes),
                human_size(max)
            ),
            None => format!("{} (no max_size)", human_size(bytes)),
        };
        let _ = write!(
            html,
            "<p>{usage}</p><p>{} entries, {} pinned</p>",
            store["entries"].as_u64().unwrap_or(0),
            human_size(store["pinned_bytes"].as_u64().unwrap_or(0)),
        );
        let tier = &stats["object_tier"];
        if tier.is_object() {
            let state = if tier["up"].as_bool() == Some(true) {
                "up".to_owned()
            } else {
                format!(
                    "<span class=\"bad\">down</span>: {}",
                    escape(tier["last_error"].as_str().unwrap_or("no answer yet"))
                )
            };
            let _ = write!(html, "<p id=\"object-tier\">Object tier: {state}</p>");
        }
    });
}

/// A ratio in `[0, 1]` as a percentage with one decimal; "n/a" before there is one (`null`).
fn percent(ratio: &Value) -> String {
    match ratio.as_f64() {
        Some(ratio) => format!("{:.1} %", ratio * 100.0),
        None => "n/a".to_owned(),
    }
}

/// `sha256:` and the first 12 hex digits, the way `docker images` shortens IDs.
fn short_digest(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats() -> Value {
        json!({
            "uptime_seconds": 300,
            "lookups": {"hits": 93, "misses": 7, "hit_ratio": 0.93},
            "bytes": {"from_cache": 8_000_000, "from_upstream": 2_000_000, "saved_ratio": 0.8},
            "registries": [{"registry": "docker.io", "hits": 93, "misses": 7, "hit_ratio": 0.93,
                "bytes_from_cache": 8_000_000, "bytes_from_upstream": 2_000_000, "upstream_errors": 2,
                "rate_limit": {"limit": 100, "remaining": 87, "window_seconds": 21600, "observed_seconds_ago": 12}},
                {"registry": "ghcr.io", "hits": 0, "misses": 0, "hit_ratio": null,
                "bytes_from_cache": 0, "bytes_from_upstream": 0, "upstream_errors": 0, "rate_limit": null}],
            "downloads": [{"digest": "sha256:0123456789abcdef0123456789abcdef", "received": 250, "size": 1000, "seconds": 3},
                          {"digest": "sha256:fedcba", "received": 10, "size": null, "seconds": 1}],
            "store": {"bytes": 5_000_000, "entries": 12, "max_size": 10_000_000, "pinned_bytes": 1_000_000},
            "object_tier": {"up": false, "last_error": "connection <refused>"},
        })
    }

    fn image(repository: &str, tag: &str, size: u64, pulls: u64) -> Value {
        json!({"registry": "docker.io", "repository": repository, "tag": tag,
               "digest": "sha256:aa", "media_type": "application/vnd.oci.image.index.v1+json",
               "size": size, "cached": true, "pinned": false, "pull_count": pulls,
               "last_pulled": null, "last_pulled_seconds_ago": null, "recorded": "2026-12-03T17:00:00Z"})
    }

    fn listing() -> Value {
        json!({"images": [image("library/alpine", "3.20", 3_000_000, 40),
                          image("library/nginx", "1.27", 70_000_000, 2)],
               "next_cursor": null})
    }

    fn history() -> Value {
        json!({"interval_seconds": 10, "points": [
            {"t": 1000, "requests": 4, "bytes_from_cache": 100, "bytes_from_upstream": 300},
            {"t": 1010, "requests": 8, "bytes_from_cache": 400, "bytes_from_upstream": 0}]})
    }

    fn all() -> Sources {
        Sources {
            stats: Ok(stats()),
            largest: Ok(listing()),
            most_pulled: Ok(listing()),
            history: Ok(history()),
        }
    }

    /// The text of the element that follows `id="ID"` up to the next `<`.
    fn element_text<'a>(html: &'a str, id: &str) -> &'a str {
        let start = html
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no id {id} in {html}"));
        let rest = &html[start..];
        let open = rest.find('>').unwrap() + 1;
        let close = rest[open..].find('<').unwrap();
        &rest[open..open + close]
    }

    /// The HTML of the section with `id`.
    fn section<'a>(html: &'a str, id: &str) -> &'a str {
        let start = html
            .find(&format!("id=\"{id}\"><h2>"))
            .unwrap_or_else(|| panic!("no section {id} in {html}"));
        let end = html[start..].find("</section>").unwrap();
        &html[start..start + end]
    }

    #[test]
    fn renders_every_panel_from_the_api() {
        let html = render(&all());
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
        assert_eq!(element_text(&html, "hit-ratio"), "93.0 %");
        assert_eq!(element_text(&html, "bytes-saved"), "8.00MB");
        assert_eq!(element_text(&html, "saved-ratio"), "80.0 %");
        assert_eq!(element_text(&html, "uptime"), "up 5m");
        let downloads = section(&html, "downloads");
        assert!(
            downloads.contains("<progress value=\"250\" max=\"1000\">"),
            "{downloads}"
        );
        assert!(downloads.contains(">sha256:0123456789ab<"), "{downloads}");
        assert!(downloads.contains("<progress></progress>"), "{downloads}");
        let registries = section(&html, "registries");
        assert!(registries.contains("docker.io"), "{registries}");
        assert!(
            registries.contains(
                "value=\"87\" max=\"100\"></progress> 87 of 100 left per 6h, seen 12s ago"
            ),
            "{registries}"
        );
        assert!(registries.contains("not reported"), "{registries}");
        let store = section(&html, "store");
        assert!(
            store.contains("<progress id=\"store-usage\" value=\"5000000\" max=\"10000000\">"),
            "{store}"
        );
        assert!(store.contains("12 entries, 1.00MB pinned"), "{store}");
        assert!(store.contains("connection &lt;refused&gt;"), "{store}");
    }

    #[test]
    fn images_tables_are_ordered_by_size_and_by_pulls() {
        let html = render(&all());
        let images = section(&html, "images");
        let largest = &images[images.find("id=\"largest-images\"").unwrap()..];
        let largest = &largest[..largest.find("</table>").unwrap()];
        assert!(
            largest.find("library/nginx:1.27").unwrap()
                < largest.find("library/alpine:3.20").unwrap(),
            "{largest}"
        );
        let pulled = &images[images.find("id=\"most-pulled-images\"").unwrap()..];
        assert!(
            pulled.find("docker.io/library/alpine:3.20").unwrap()
                < pulled.find("docker.io/library/nginx:1.27").unwrap(),
            "{pulled}"
        );
    }

    #[test]
    fn the_top_tables_stop_at_ten() {
        let many: Vec<Value> = (0..25)
            .map(|i| image(&format!("r/{i}"), "t", i, i))
            .collect();
        let mut sources = all();
        sources.largest = Ok(json!({"images": many, "next_cursor": null}));
        let html = render(&sources);
        let largest = &html[html.find("id=\"largest-images\"").unwrap()..];
        let largest = &largest[..largest.find("</table>").unwrap()];
        assert_eq!(largest.matches("<tr class=\"image\">").count(), TOP);
        assert!(largest.contains("r/24:t") && !largest.contains("r/14:t"));
    }

    #[test]
    fn the_chart_is_svg_drawn_from_the_history() {
        let html = render(&all());
        let chart = section(&html, "history");
        let requests = &chart[chart.find("id=\"requests-chart\"").unwrap()..];
        let requests = &requests[..requests.find("</div>").unwrap()];
        assert_eq!(requests.matches("<rect class=\"requests\"").count(), 2);
        // The larger point fills the drawing height.
        assert!(
            requests.contains(&format!("height=\"{:.1}\"", CHART_HEIGHT)),
            "{requests}"
        );
        assert!(requests.contains("max 8 requests per 10 s"), "{requests}");
        let bytes = &chart[chart.find("id=\"bytes-chart\"").unwrap()..];
        let bytes = &bytes[..bytes.find("</div>").unwrap()];
        // First point: cache and upstream stacked; second: cache only.
        assert_eq!(bytes.matches("<rect class=\"cache\"").count(), 2);
        assert_eq!(bytes.matches("<rect class=\"upstream\"").count(), 1);
        // The latest point is at the right edge.
        let last_x = CHART_WIDTH - (CHART_WIDTH / history::POINTS as f64).max(1.0);
        assert!(
            requests.contains(&format!("x=\"{last_x:.1}\"")),
            "{requests}"
        );
    }

    #[test]
    fn strings_from_clients_are_escaped() {
        let mut sources = all();
        sources.largest = Ok(
            json!({"images": [image("evil/<script>alert(1)</script>", "\"x'&", 1, 1)],
                                     "next_cursor": null}),
        );
        let mut stats = stats();
        stats["registries"][0]["registry"] = json!("<b>reg</b>");
        stats["downloads"][0]["digest"] = json!("sha256:<i>\"");
        sources.stats = Ok(stats);
        let html = render(&sources);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>reg"), "{html}");
        assert!(!html.contains("<i>"), "{html}");
        assert!(html.contains("evil/&lt;script&gt;alert(1)&lt;/script&gt;:&quot;x&#39;&amp;"));
        assert!(html.contains("&lt;b&gt;reg&lt;/b&gt;"));
        assert!(html.contains("title=\"sha256:&lt;i&gt;&quot;\""));
    }

    #[test]
    fn a_source_that_errs_leaves_its_panels_not_available() {
        let sources = Sources {
            stats: Err("GET /api/v1/stats is not built yet".to_owned()),
            largest: Err("GET /api/v1/images is <not> built yet".to_owned()),
            most_pulled: Ok(listing()),
            history: Ok(history()),
        };
        let html = render(&sources);
        for id in ["summary", "downloads", "registries", "store"] {
            assert!(
                section(&html, id).contains("not available: GET /api/v1/stats is not built yet"),
                "{id}: {html}"
            );
        }
        assert!(!html.contains("id=\"hit-ratio\""));
        let images = section(&html, "images");
        assert!(images.contains("not available: GET /api/v1/images is &lt;not&gt; built yet"));
        assert!(images.contains("id=\"most-pulled-images\""), "{images}");
        assert!(section(&html, "history").contains("id=\"requests-chart\""));
    }

    #[test]
    fn no_lookups_yet_is_not_a_ratio() {
        let mut stats = stats();
        stats["lookups"]["hit_ratio"] = Value::Null;
        let sources = Sources {
            stats: Ok(stats),
            ..all()
        };
        assert_eq!(element_text(&render(&sources), "hit-ratio"), "n/a");
    }
}
