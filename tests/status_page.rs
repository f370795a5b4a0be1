//! The status page in a real browser: after pulls through gantry from the real upstream, Debian's
//! headless chromium loads the admin listener's `/`, and the rendered DOM shows the chart drawn
//! from the history ring, the pulled image in the images panel and a numeric hit ratio; a
//! screenshot of it is a PNG.
//!
//! Set `GANTRY_STATUS_SCREENSHOT=docs/status-page.png` to keep the screenshot (that is how the
//! one in docs/ was taken).

mod common;

use common::browser;
use common::{http_get, pull, require_tools, skip_unless, Fixture, Gantry};

/// The text content of the element carrying `id="ID"`, up to its first child or end tag.
fn element_text<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let rest = &dom[dom.find(&format!("id=\"{id}\""))?..];
    let open = rest.find('>')? + 1;
    let close = rest[open..].find('<')?;
    Some(rest[open..open + close].trim())
}

/// The markup of the element carrying `id="ID"` up to the first `</TAG>` after it.
fn element<'a>(dom: &'a str, id: &str, tag: &str) -> Option<&'a str> {
    let rest = &dom[dom.find(&format!("id=\"{id}\""))?..];
    Some(&rest[..rest.find(&format!("</{tag}>"))?])
}

/// `93.0 %` → 93.0: a number, then a percent sign, nothing else (what the regex
/// `^[0-9]+(\.[0-9]+)? ?%$` admits).
fn percentage(text: &str) -> Option<f64> {
    let number = text.strip_suffix('%')?.trim_end();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    number.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_in_chromium_after_a_pull() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    if !skip_unless(
        browser::chromium().is_some(),
        "missing tool: chromium (scripts/test installs it)",
    ) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let image = format!("{}/test/multi:v1", gantry.host());
    // Twice: the first pull fills the cache (misses), the second is served from it (hits).
    for _ in 0..2 {
        let (_dir, pulled) = pull(&image, false).await;
        pulled.unwrap();
    }
    gantry.settled().await;

    let history = http_get(&gantry.admin_url("/api/v1/history"), &[])
        .await
        .unwrap();
    assert_eq!(history.status, 200);
    let history = history.json();
    assert_eq!(history["interval_seconds"], 10, "{history}");
    let requests: u64 = history["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|point| point["requests"].as_u64().unwrap())
        .sum();
    assert!(
        requests >= 10,
        "two pulls of a 4-layer image show in the history: {history}"
    );

    let temp = tempfile::tempdir().unwrap();
    let url = gantry.admin_url("/");
    let dom = browser::dump_dom(temp.path(), &url).await;
    let png = temp.path().join("status.png");
    browser::screenshot(temp.path(), &url, &png, 1280, 1000).await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(browser::is_png(&bytes), "{} is not a PNG", png.display());
    if let Some(keep) = std::env::var_os("GANTRY_STATUS_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }

    assert!(dom.contains("<title>gantry status</title>"), "{dom}");
    let chart = element(&dom, "requests-chart", "svg").unwrap_or_else(|| panic!("{dom}"));
    assert!(
        chart.contains("<rect class=\"requests\""),
        "the chart has a bar for the pulls: {chart}"
    );
    let images = element(&dom, "images", "section").unwrap_or_else(|| panic!("{dom}"));
    assert!(
        images.contains("test/multi"),
        "the images panel lists the pulled image: {images}"
    );
    let hit_ratio = element_text(&dom, "hit-ratio")
        .unwrap_or_else(|| panic!("no hit ratio on the page: {dom}"));
    let ratio = percentage(hit_ratio)
        .unwrap_or_else(|| panic!("the hit ratio {hit_ratio:?} is not a percentage"));
    assert!(
        ratio > 0.0 && ratio <= 100.0,
        "the second pull hit: {hit_ratio}"
    );

    gantry.stop().await;
}

#[test]
fn percentages_are_numbers_and_a_percent_sign() {
    assert_eq!(percentage("93.0 %"), Some(93.0));
    assert_eq!(percentage("100%"), Some(100.0));
    assert_eq!(percentage("n/a"), None);
    assert_eq!(percentage("1e2 %"), None);
    assert_eq!(percentage(" %"), None);
}
