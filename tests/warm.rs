//! `gantry warm` fills a running mirror so the next client pull makes no upstream blob request.

mod common;

use common::{pull, require_tools, Fixture, Gantry};

async fn warm(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("warm")
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fills_the_cache_for_the_next_pull() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let mirror = gantry.url("");
    let list = gantry.dir.path().join("images.txt");
    std::fs::write(&list, "# images for CI\ntest/index:idx\n").unwrap();
    let output = warm(&[
        "--mirror",
        &mirror,
        "--file",
        list.to_str().unwrap(),
        "test/multi:v1",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("warmed 2 of 2 images"), "{stdout}");
    let warmed_blobs: usize = fixture.proxy.blob_gets().values().sum();
    let expected = fixture.multi.blobs().len()
        + fixture
            .platforms
            .iter()
            .map(|p| p.blobs().len())
            .sum::<usize>();
    assert_eq!(
        warmed_blobs, expected,
        "every blob of both images, each fetched once"
    );

    fixture.proxy.clear();
    pull(&format!("{}/test/multi:v1", gantry.host()), false)
        .await
        .1
        .unwrap();
    pull(&format!("{}/test/index:idx", gantry.host()), true)
        .await
        .1
        .unwrap();
    assert!(
        fixture.proxy.blob_gets().is_empty(),
        "{:?}",
        fixture.proxy.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_takes_one_platform_and_fails_loudly() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let mirror = gantry.url("");
    let output = warm(&[
        "--mirror",
        &mirror,
        "--platform",
        "linux/arm64",
        "test/index:idx",
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let gets = fixture.proxy.blob_gets();
    let arm64 = &fixture.platforms[1];
    assert_eq!(
        gets.len(),
        arm64.blobs().len(),
        "only the arm64 blobs: {gets:?}"
    );
    assert!(arm64.blobs().iter().all(|b| gets.contains_key(b)));

    let failed = warm(&["--mirror", &mirror, "test/multi:v1", "test/missing:v1"]).await;
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("test/missing:v1"), "{stderr}");
    assert!(String::from_utf8_lossy(&failed.stdout).contains("warmed 1 of 2 images"));
}
