//! The store's catalogue (tags → manifests → references) is written as content is fetched, and
//! is there for the next process (the control plane's `ls`/`inspect`/purge read it).

mod common;

use std::time::Duration;

use common::{pull, require_tools, wait_until, Fixture, Gantry, Options};
use gantry::oci::Digest;
use gantry::store::{Catalogue, CATALOGUE_DIR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_records_its_tag_index_manifests_and_blobs_in_the_catalogue() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options::default(),
    )
    .await;
    let (_out, result) = pull(&format!("{}/test/index:idx", gantry.host()), true).await;
    result.expect("pull through gantry");
    gantry.settled().await;
    let dir = gantry.stop().await;

    // What the stopped gantry wrote, read back by a fresh reader as the next process would.
    let catalogue_dir = dir.path().join("store").join(CATALOGUE_DIR);
    let index = Digest::parse(&fixture.index_digest).unwrap();
    let recorded = wait_until(Duration::from_secs(10), || async {
        Catalogue::open(&catalogue_dir).ok().is_some_and(|c| {
            fixture.platforms.iter().all(|p| {
                c.manifest(&Digest::parse(&p.manifest_digest).unwrap())
                    .is_some()
            })
        })
    })
    .await;
    assert!(recorded, "every platform manifest reached the journal");
    let catalogue = Catalogue::open(&catalogue_dir).unwrap();

    let tags = catalogue.tags();
    let tag = tags
        .iter()
        .find(|t| t.repository == "test/index" && t.tag == "idx")
        .unwrap_or_else(|| panic!("the pulled tag is recorded: {:?}", tags.len()));
    assert_eq!(tag.digest, index);
    assert_eq!(tag.media_type, "application/vnd.oci.image.index.v1+json");

    let recorded_index = catalogue.manifest(&index).expect("the index is recorded");
    let children: Vec<String> = recorded_index
        .references
        .iter()
        .map(|(digest, _)| digest.to_string())
        .collect();
    let platforms: Vec<String> = fixture
        .platforms
        .iter()
        .map(|p| p.manifest_digest.clone())
        .collect();
    assert_eq!(children, platforms, "the index references its platforms");

    for platform in &fixture.platforms {
        let record = catalogue
            .manifest(&Digest::parse(&platform.manifest_digest).unwrap())
            .unwrap();
        assert_eq!(record.size, platform.manifest_size as u64);
        let mut referenced: Vec<(String, u64)> = record
            .references
            .iter()
            .map(|(digest, size)| (digest.to_string(), *size))
            .collect();
        referenced.sort();
        let mut blobs = platform.layers.clone();
        let config = referenced
            .iter()
            .find(|(digest, _)| *digest == platform.config_digest)
            .cloned()
            .expect("the config is referenced");
        blobs.push(config);
        blobs.sort();
        assert_eq!(referenced, blobs, "config and layers, with their sizes");
    }
}
