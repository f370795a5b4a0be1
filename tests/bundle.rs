//! `gantry export` and `gantry import` as the real commands, between two stores: mirror A pulls
//! from a real upstream and exports; skopeo and podman read the bundle; B, `offline: true` and
//! whose upstream is gone, imports it and serves it by tag to skopeo, podman and ctr with the
//! upstream's digests, and answers a tag it never saw with the offline 404. Damaged bundles are
//! refused naming the entry, with B's store byte for byte unchanged, and an import into a store a
//! gantry process serves is refused with exit 2. `export --mirror` writes the same bundle through
//! a running mirror that has nothing cached, and fails naming the image (not found, a blob unlike
//! its descriptor) or the URL (unreachable) with no file left; `--platform` and `--all-cached`
//! choose what a bundle holds; dockerd's `docker load` reads an index's bundle.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::clients::{
    registries_conf, Containerd, Dockerd, DockerdSetup, Podman, Trap, DOCKER_TOOLS,
};
use common::fake::{Fake, Scripted};
use common::process::GantryProcess;
use common::{
    config_yaml, file_digest, free_port, pull, require_tools, skopeo, Fixture, Gantry, Options,
};
use sha2::Digest as _;
use tempfile::TempDir;

async fn gantry(args: &[&str]) -> Output {
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(120), command)
        .await
        .expect("gantry finishes")
        .expect("the gantry binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Writes the harness config for a store in `dir`, mirroring `upstream_url`.
fn write_config(dir: &Path, upstream_url: &str) -> PathBuf {
    let path = dir.join("gantry.yaml");
    std::fs::write(&path, config_yaml(dir, upstream_url, Options::default())).unwrap();
    path
}

/// Every file, directory and link under `root` with its content's hash: the store "byte for byte".
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            let relative = path.strip_prefix(root).unwrap().to_owned();
            if kind.is_dir() {
                found.insert(relative, "dir".to_owned());
                pending.push(path);
            } else if kind.is_symlink() {
                found.insert(
                    relative,
                    format!("link {:?}", std::fs::read_link(&path).unwrap()),
                );
            } else {
                found.insert(relative, file_digest(&path));
            }
        }
    }
    found
}

/// Mirror A, filled with both fixture images through real pulls, then stopped; its upstream
/// (the registry) is returned so the test decides when it goes away.
struct Exported {
    fixture: Fixture,
    /// A's stopped store and its config (`gantry.yaml`), for further exports.
    a: TempDir,
    work: TempDir,
    bundle: PathBuf,
    /// The upstream's URL (B names the same upstream, as an isolated twin of A would).
    upstream: String,
}

async fn exported(images: &[&str]) -> Exported {
    let fixture = Fixture::start().await;
    let upstream = format!("http://{}", fixture.registry.host());
    let a = Gantry::start(&upstream).await;
    for (reference, all) in [("test/index:idx", true), ("test/multi:v1", false)] {
        pull(&format!("{}/{reference}", a.host()), all)
            .await
            .1
            .unwrap();
    }
    a.settled().await;
    let a_dir = a.stop().await;
    let a_config = write_config(a_dir.path(), &upstream);
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle.tar");
    let mut args = vec![
        "export",
        "--config",
        a_config.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ];
    args.extend_from_slice(images);
    let output = gantry(&args).await;
    assert!(output.status.success(), "export failed:\n{}", text(&output));
    Exported {
        fixture,
        a: a_dir,
        work,
        bundle,
        upstream,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_bundle_loads_in_skopeo_and_podman_and_imports_into_an_offline_mirror() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let exported = exported(&["test/index:idx", "test/multi:v1"]).await;
    let fixture = &exported.fixture;
    let host = fixture.registry.host();

    // skopeo reads every platform of the index, with the upstream's digests.
    let out = exported.work.path().join("from-bundle");
    skopeo(&[
        "copy",
        "--all",
        &format!(
            "oci-archive:{}:{host}/test/index:idx",
            exported.bundle.display()
        ),
        &format!("dir:{}", out.display()),
    ])
    .await;
    assert_eq!(
        file_digest(&out.join("manifest.json")),
        fixture.index_digest
    );
    for image in &fixture.platforms {
        let hex = image.manifest_digest.trim_start_matches("sha256:");
        assert_eq!(
            file_digest(&out.join(format!("{hex}.manifest.json"))),
            image.manifest_digest
        );
        for blob in image.blobs() {
            assert!(
                out.join(blob.trim_start_matches("sha256:")).exists(),
                "{blob} copied"
            );
        }
    }

    // podman loads it under the name users write; its image ID is the config's digest (podman
    // stores a manifest of its own for the uncompressed layers it keeps).
    if common::which("podman").is_some() {
        let trap = Trap::start().await;
        let conf = exported.work.path().join("registries.conf");
        registries_conf(&conf, &[]);
        let podman = Podman::new(&conf);
        let bundle = exported.bundle.to_str().unwrap();
        let load = podman.podman(&["load", "-i", bundle], &trap).await;
        assert!(load.ok, "{}", load.text());
        let listing = podman
            .podman(&["images", "--digests", "--no-trunc"], &trap)
            .await;
        let run = podman
            .podman(
                &[
                    "image",
                    "inspect",
                    "--format",
                    "{{.Id}}",
                    &format!("{host}/test/multi:v1"),
                ],
                &trap,
            )
            .await;
        assert!(run.ok, "{}", run.text());
        assert_eq!(
            format!("sha256:{}", run.stdout.trim()),
            fixture.multi.config_digest,
            "{}\n{}\n{}",
            run.text(),
            load.text(),
            listing.text()
        );
    }

    // B: the same upstream name, but the upstream is gone.
    let Exported {
        fixture,
        bundle,
        upstream,
        work,
        a: _a,
    } = exported;
    let Fixture {
        registry,
        index_digest,
        platforms,
        multi,
        ..
    } = fixture;
    registry.stop().await;
    let b_dir = tempfile::tempdir().unwrap();
    import(b_dir.path(), &bundle, &upstream).await;

    let store = b_dir.path().join("store");
    let mut manifests = vec![index_digest.clone(), multi.manifest_digest.clone()];
    let mut blobs = multi.blobs();
    for image in &platforms {
        manifests.push(image.manifest_digest.clone());
        blobs.extend(image.blobs());
    }
    for blob in &blobs {
        assert_eq!(
            file_digest(&common::blob_path(&store, blob)),
            *blob,
            "blob {blob} imported"
        );
    }
    for manifest in &manifests {
        let hex = manifest.trim_start_matches("sha256:");
        let path = store.join("manifests/sha256").join(&hex[..2]).join(hex);
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("manifest {manifest}: {e}"));
        let body = &stored[stored.iter().position(|b| *b == b'\n').unwrap() + 1..];
        assert_eq!(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(body))),
            *manifest
        );
    }
    {
        let store = gantry::store::Store::open(
            &store,
            Default::default(),
            std::sync::Arc::new(gantry::metrics::Metrics::new()),
        )
        .unwrap();
        let tags: Vec<(String, String, String, String)> = store
            .catalogue()
            .tags()
            .into_iter()
            .map(|t| (t.registry, t.repository, t.tag, t.digest.to_string()))
            .collect();
        assert_eq!(
            tags,
            [
                (
                    host.clone(),
                    "test/index".to_owned(),
                    "idx".to_owned(),
                    index_digest.clone()
                ),
                (
                    host.clone(),
                    "test/multi".to_owned(),
                    "v1".to_owned(),
                    multi.manifest_digest.clone()
                ),
            ]
        );
    }

    // B is offline: it never contacts its upstream (gone anyway) and serves only what was imported.
    let b = Gantry::start_with(
        b_dir,
        &upstream,
        Options {
            mirroring: "  offline: true",
            ..Options::default()
        },
    )
    .await;
    let ready = common::http_get(&b.admin_url("/readyz"), &[])
        .await
        .unwrap();
    assert!(
        ready.json()["offline"]
            .as_array()
            .is_some_and(|offline| !offline.is_empty()),
        "readyz says offline: {:?}",
        ready.body
    );
    // By tag, every platform: the tag comes from the imported catalogue, with the upstream's digest.
    let (by_tag, result) = pull(&format!("{}/test/index:idx", b.host()), true).await;
    result.unwrap_or_else(|e| panic!("pull by tag through offline B: {e}"));
    assert_eq!(
        file_digest(&by_tag.path().join("image/manifest.json")),
        index_digest
    );
    // A tag B never saw: 404 saying the mirror is offline and how to bring the image in.
    let unseen = common::http_get(&b.url("/v2/test/index/manifests/never-exported"), &[])
        .await
        .unwrap();
    assert_eq!(unseen.status, http::StatusCode::NOT_FOUND);
    let message = String::from_utf8_lossy(&unseen.body).into_owned();
    assert!(
        message.contains("MANIFEST_UNKNOWN")
            && message.contains("offline")
            && message.contains("gantry import"),
        "{message}"
    );
    // podman and containerd, pointed at B as the mirror of a registry name, pull the tag too.
    let trap = Trap::start().await;
    if common::which("podman").is_some() {
        let conf = work.path().join("registries-b.conf");
        registries_conf(&conf, &[("offline.example", "offline.example", &b.host())]);
        let podman = Podman::new(&conf);
        podman
            .pull("offline.example/test/index:idx", &trap, &[])
            .await;
        let digest = podman
            .podman(
                &[
                    "image",
                    "inspect",
                    "--format",
                    "{{.Digest}}",
                    "offline.example/test/index:idx",
                ],
                &trap,
            )
            .await;
        assert_eq!(digest.stdout.trim(), index_digest, "{}", digest.text());
    }
    if common::which("containerd").is_some() && common::which("ctr").is_some() {
        // containerd says which registry it wants (`?ns=`): the imported images' own, A's upstream.
        let containerd = Containerd::start().await;
        let hosts = work.path().join("certs.d");
        Containerd::write_hosts_toml(&hosts, &host, &format!("http://{host}"), &b.url(""));
        let reference = format!("{host}/test/index:idx");
        containerd
            .pull(&hosts, &["--all-platforms"], &reference, &trap, &[])
            .await;
        assert_eq!(
            containerd.image_digest(&reference, &trap).await.as_deref(),
            Some(index_digest.as_str())
        );
    }
    trap.assert_untouched("pulls through offline B");
    // And by digest.
    let blobs: Vec<String> = platforms.iter().flat_map(|p| p.blobs()).collect();
    let reference = format!("{}/test/index@{index_digest}", b.host());
    assert_pulled(&reference, true, &index_digest, &blobs).await;
    drop(work);
}

/// Rewrites a tar entry by entry: `change` gets each name and content and returns what to write
/// instead (`None` drops the entry).
fn rewrite(
    from: &Path,
    to: &Path,
    mut change: impl FnMut(&str, Vec<u8>) -> Option<(String, Vec<u8>)>,
) {
    use std::io::Read;
    let mut archive = tar::Archive::new(std::fs::File::open(from).unwrap());
    let mut builder = tar::Builder::new(std::fs::File::create(to).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        if let Some((name, content)) = change(&name, content) {
            append_raw(&mut builder, &name, &content);
        }
    }
    builder.finish().unwrap();
}

/// Appends an entry under a name written as is (the tar crate refuses `..` in `append_data`).
fn append_raw(builder: &mut tar::Builder<std::fs::File>, name: &str, content: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, content).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bundles_are_refused_naming_the_entry_and_leave_the_store_unchanged() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let exported = exported(&["test/index:idx", "test/multi:v1"]).await;
    let fixture = &exported.fixture;
    let work = exported.work.path();
    let good = &exported.bundle;

    // B holds a store already (the good bundle imported once), so "unchanged" covers
    // blobs, manifests, links and the catalogue.
    let b_dir = tempfile::tempdir().unwrap();
    let b_config = write_config(b_dir.path(), &exported.upstream);
    let b_config = b_config.to_str().unwrap();
    {
        let output = gantry(&["import", "--config", b_config, good.to_str().unwrap()]).await;
        assert!(output.status.success(), "{}", text(&output));
    }
    let before = tree(&b_dir.path().join("store"));
    assert!(before.len() > 10, "{before:?}");

    let (largest, _) = fixture
        .multi
        .layers
        .iter()
        .max_by_key(|(_, size)| *size)
        .unwrap()
        .clone();
    let largest_entry = format!("blobs/sha256/{}", largest.trim_start_matches("sha256:"));
    let missing = fixture.platforms[1].layers[0].0.clone();
    let missing_entry = format!("blobs/sha256/{}", missing.trim_start_matches("sha256:"));
    let length = std::fs::metadata(good).unwrap().len() as usize;

    let mut cases: Vec<(&str, PathBuf, String)> = Vec::new();
    let truncated = work.join("truncated.tar");
    std::fs::write(&truncated, &std::fs::read(good).unwrap()[..length / 2]).unwrap();
    cases.push(("truncated", truncated, String::new()));

    let flipped = work.join("flipped.tar");
    rewrite(good, &flipped, |name, mut content| {
        if name == largest_entry {
            let middle = content.len() / 2;
            content[middle] ^= 0xff;
        }
        Some((name.to_owned(), content))
    });
    cases.push((
        "a blob that does not match its name",
        flipped,
        largest_entry.clone(),
    ));

    let twice = work.join("twice.tar");
    rewrite(good, &twice, |name, content| {
        if name != "gantry-bundle.json" {
            return Some((name.to_owned(), content));
        }
        let mut bundle: serde_json::Value = serde_json::from_slice(&content).unwrap();
        // test/index:idx renamed test/multi:v1: one tag, two digests.
        for image in bundle["images"].as_array_mut().unwrap() {
            image["repository"] = "test/multi".into();
            image["tag"] = "v1".into();
        }
        Some((name.to_owned(), serde_json::to_vec(&bundle).unwrap()))
    });
    cases.push((
        "a tag named twice with two digests",
        twice,
        "gantry-bundle.json".to_owned(),
    ));

    let traversal = work.join("traversal.tar");
    rewrite(good, &traversal, |name, content| {
        Some((name.to_owned(), content))
    });
    {
        // Appended at the end, after everything else checked out.
        let mut bytes = std::fs::read(&traversal).unwrap();
        bytes.truncate(bytes.len() - 1024);
        std::fs::write(&traversal, bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&traversal)
            .unwrap();
        let mut builder = tar::Builder::new(file);
        append_raw(&mut builder, "../x", b"outside the store");
        builder.finish().unwrap();
    }
    cases.push(("a ../ entry name", traversal, "../x".to_owned()));

    let not_tar = work.join("not-a-tar.tar");
    let noise: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&not_tar, noise).unwrap();
    cases.push(("not a tar", not_tar, "(the archive)".to_owned()));

    let incomplete = work.join("incomplete.tar");
    rewrite(good, &incomplete, |name, content| {
        (name != missing_entry).then(|| (name.to_owned(), content))
    });
    cases.push((
        "a manifest referencing a missing blob",
        incomplete,
        missing_entry.clone(),
    ));

    for (case, path, entry) in &cases {
        let output = gantry(&["import", "--config", b_config, path.to_str().unwrap()]).await;
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{case}: {said}");
        assert!(said.contains("the store is unchanged"), "{case}: {said}");
        if case == &"truncated" {
            assert!(
                said.contains("blobs/sha256/") || said.contains("truncated"),
                "{case}: {said}"
            );
        } else {
            assert!(
                said.contains(entry.as_str()),
                "{case}: the message names {entry}: {said}"
            );
        }
        assert_eq!(
            tree(&b_dir.path().join("store")),
            before,
            "{case}: the store changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_a_store_a_gantry_process_serves() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let exported = exported(&["test/multi:v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut serving = GantryProcess::configure(dir.path(), &exported.upstream, Options::default());
    serving.start().await;
    let config = dir.path().join("gantry.yaml");
    let before = tree(&dir.path().join("store"));
    let output = gantry(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        exported.bundle.to_str().unwrap(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let store = dir.path().join("store");
    assert!(
        text(&output).contains(&format!(
            "gantry is serving {}; stop it first",
            store.display()
        )),
        "{}",
        text(&output)
    );
    assert_eq!(tree(&store), before);

    // The refusal was the server's lock: stopped, the same import goes through.
    serving.signal("TERM");
    assert!(serving
        .wait(std::time::Duration::from_secs(20))
        .await
        .success());
    let output = gantry(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        exported.bundle.to_str().unwrap(),
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output));
}

/// The entries of a bundle, by name, with their contents.
fn entries(bundle: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    let mut found = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        found.insert(name, content);
    }
    found
}

fn blob_entry(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn json_entry(entries: &BTreeMap<String, Vec<u8>>, name: &str) -> serde_json::Value {
    serde_json::from_slice(entries.get(name).unwrap_or_else(|| panic!("no {name}"))).unwrap()
}

/// `gantry import` of `bundle` into a store in `dir` whose config mirrors `upstream`.
async fn import(dir: &Path, bundle: &Path, upstream: &str) {
    let config = write_config(dir, upstream);
    let output = gantry(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        bundle.to_str().unwrap(),
    ])
    .await;
    assert!(output.status.success(), "import failed:\n{}", text(&output));
}

/// A store filled from `bundle` by `gantry import`, served by a gantry that is offline (its
/// upstream, `upstream`, is gone in these tests).
async fn offline_mirror(bundle: &Path, upstream: &str) -> Gantry {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), bundle, upstream).await;
    Gantry::start_with(
        dir,
        upstream,
        Options {
            mirroring: "  offline: true",
            ..Options::default()
        },
    )
    .await
}

/// Pulls `reference` with skopeo (`--all` if `all`): its manifest is `manifest` and every blob
/// of `blobs` arrives intact.
async fn assert_pulled(reference: &str, all: bool, manifest: &str, blobs: &[String]) {
    let (pulled, result) = pull(reference, all).await;
    result.unwrap_or_else(|e| panic!("pull {reference}: {e}"));
    let image = pulled.path().join("image");
    assert_eq!(file_digest(&image.join("manifest.json")), manifest);
    for blob in blobs {
        assert_eq!(
            file_digest(&image.join(blob.trim_start_matches("sha256:"))),
            *blob
        );
    }
}

/// Names of the files in `dir` (an export that failed leaves none, not even a partial one).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_a_mirror_pulls_what_it_lacks_and_writes_the_bundle_the_store_gives() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let host = fixture.registry.host();
    let upstream = format!("http://{host}");
    let a = Gantry::start(&upstream).await;
    let work = tempfile::tempdir().unwrap();
    let through = work.path().join("through.tar");
    // The mirror's default registry, named by its host as the mirror's catalogue names it.
    let image = format!("{host}/test/index:idx");
    let output = gantry(&[
        "export",
        "--mirror",
        &a.url(""),
        "-o",
        through.to_str().unwrap(),
        &image,
    ])
    .await;
    assert!(output.status.success(), "export failed:\n{}", text(&output));
    // A had nothing: it pulled every platform's blobs from the upstream to answer.
    a.settled().await;
    let a_store = a.dir.path().join("store");
    for blob in fixture.platforms.iter().flat_map(|p| p.blobs()) {
        assert!(
            common::blob_path(&a_store, &blob).exists(),
            "{blob} cached by A"
        );
    }

    // The same image from A's store once A has stopped: the same bundle, byte for byte (entries
    // are written in the walk's order with no timestamps, whatever the source).
    let a_dir = a.stop().await;
    let config = write_config(a_dir.path(), &upstream);
    let from_store = work.path().join("store.tar");
    let output = gantry(&[
        "export",
        "--config",
        config.to_str().unwrap(),
        "-o",
        from_store.to_str().unwrap(),
        "test/index:idx",
    ])
    .await;
    assert!(output.status.success(), "export failed:\n{}", text(&output));
    let (through_entries, store_entries) = (entries(&through), entries(&from_store));
    assert_eq!(
        through_entries.keys().collect::<Vec<_>>(),
        store_entries.keys().collect::<Vec<_>>()
    );
    for name in ["index.json", "gantry-bundle.json", "manifest.json"] {
        assert_eq!(
            json_entry(&through_entries, name),
            json_entry(&store_entries, name),
            "{name}"
        );
    }
    assert!(
        std::fs::read(&through).unwrap() == std::fs::read(&from_store).unwrap(),
        "the bundles differ"
    );
    let bundle = json_entry(&through_entries, "gantry-bundle.json");
    assert_eq!(bundle["images"][0]["registry"], host.as_str());
    assert_eq!(bundle["images"][0]["all_platforms"], true);

    // B, offline with the upstream gone, serves it by tag with the upstream's index digest.
    let Fixture {
        registry,
        index_digest,
        platforms,
        ..
    } = fixture;
    registry.stop().await;
    let b = offline_mirror(&through, &upstream).await;
    let blobs: Vec<String> = platforms.iter().flat_map(|p| p.blobs()).collect();
    let reference = format!("{}/test/index:idx", b.host());
    assert_pulled(&reference, true, &index_digest, &blobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_a_mirror_names_what_failed_and_leaves_no_file() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let host = fixture.registry.host();
    let a = Gantry::start(&format!("http://{host}")).await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("x.tar");
    let out = out.to_str().unwrap();
    let mirror = a.url("");

    // An image the mirror (and its upstream) does not have.
    let missing = format!("{host}/test/absent:v1");
    let output = gantry(&["export", "--mirror", &mirror, "-o", out, &missing]).await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&missing) && said.contains(&format!("not found on the mirror at {mirror}")),
        "{said}"
    );
    assert_eq!(files_in(work.path()), Vec::<String>::new());
    // One image missing among others: still no bundle.
    let output = gantry(&[
        "export",
        "--mirror",
        &mirror,
        "-o",
        out,
        &format!("{host}/test/multi:v1"),
        &missing,
    ])
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert_eq!(files_in(work.path()), Vec::<String>::new());

    // Nothing listening.
    let gone = format!("http://127.0.0.1:{}", free_port());
    let output = gantry(&["export", "--mirror", &gone, "-o", out, "alpine:3.20"]).await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("the mirror at {gone}")), "{said}");
    assert_eq!(files_in(work.path()), Vec::<String>::new());

    // Flags that do not go together.
    let config = write_config(work.path(), &format!("http://{host}"));
    let output = gantry(&[
        "export",
        "--mirror",
        &mirror,
        "--config",
        config.to_str().unwrap(),
        "-o",
        out,
        "alpine:3.20",
    ])
    .await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(64), "{said}");
    assert!(
        said.contains("--mirror and --config exclude each other"),
        "{said}"
    );
    let output = gantry(&["export", "--mirror", &mirror, "-o", out, "--all-cached"]).await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(64), "{said}");
    assert!(said.contains("--all-cached needs --config"), "{said}");
    assert_eq!(files_in(work.path()), vec!["gantry.yaml".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_a_mirror_refuses_a_blob_unlike_its_descriptor() {
    use sha2::Digest as _;
    let digest = |bytes: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (config_digest, layer_digest) = (digest(config), digest(&layer));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::images::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let mut flipped = layer.clone();
    flipped[150_000] ^= 0xff;
    let mut long = layer.clone();
    long.extend_from_slice(b"more");
    let cases = [
        ("other bytes", flipped, "hash to"),
        (
            "short",
            layer[..100_000].to_vec(),
            "ended after 100000 of the 300000 bytes",
        ),
        ("long", long, "longer than the 300000 bytes"),
    ];
    for (case, body, reason) in cases {
        let (manifest, config, layer_path) = (
            manifest.clone(),
            config.to_vec(),
            format!("/v2/test/app/blobs/{layer_digest}"),
        );
        let config_path = format!("/v2/test/app/blobs/{config_digest}");
        let mirror = Fake::start(move |seen| {
            if seen.uri == "/v2/test/app/manifests/v1" {
                Scripted::new(http::StatusCode::OK)
                    .header("content-type", common::images::OCI_MANIFEST)
                    .body(manifest.clone())
            } else if seen.uri == config_path {
                Scripted::new(http::StatusCode::OK).body(config.clone())
            } else if seen.uri == layer_path {
                Scripted::new(http::StatusCode::OK).body(body.clone())
            } else {
                Scripted::new(http::StatusCode::NOT_FOUND)
            }
        })
        .await;
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("x.tar");
        let output = gantry(&[
            "export",
            "--mirror",
            &mirror.url(),
            "-o",
            out.to_str().unwrap(),
            "test/app:v1",
        ])
        .await;
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{case}: {said}");
        assert!(
            said.contains("docker.io/test/app:v1")
                && said.contains(&format!("blob {layer_digest}"))
                && said.contains(reason),
            "{case}: {said}"
        );
        assert_eq!(
            files_in(work.path()),
            Vec::<String>::new(),
            "{case}: a file was left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_narrowed_bundle_holds_only_that_platform_and_serves_it() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let exported = exported(&["--platform", "linux/arm64", "test/index:idx"]).await;
    let found = entries(&exported.bundle);
    let arm64 = exported.fixture.platforms[1].clone();
    assert_eq!(arm64.architecture, "arm64");
    let mut expected: Vec<String> = [
        "oci-layout",
        "index.json",
        "gantry-bundle.json",
        "manifest.json",
    ]
    .map(str::to_owned)
    .into();
    expected.push(blob_entry(&exported.fixture.index_digest));
    expected.push(blob_entry(&arm64.manifest_digest));
    expected.extend(arm64.blobs().iter().map(|blob| blob_entry(blob)));
    expected.sort();
    assert_eq!(found.keys().cloned().collect::<Vec<_>>(), expected);
    let bundle = json_entry(&found, "gantry-bundle.json");
    assert_eq!(
        bundle["images"][0]["platforms"],
        serde_json::json!(["linux/arm64"])
    );
    assert_eq!(bundle["images"][0]["all_platforms"], false);
    // docker's listing names the platform the bundle holds.
    let docker = json_entry(&found, "manifest.json");
    assert_eq!(docker[0]["Config"], blob_entry(&arm64.config_digest));

    // B imports it and serves the arm64 image by digest, its blobs intact.
    let Exported {
        fixture,
        bundle,
        upstream,
        ..
    } = exported;
    fixture.registry.stop().await;
    let b = offline_mirror(&bundle, &upstream).await;
    let reference = format!("{}/test/index@{}", b.host(), arm64.manifest_digest);
    assert_pulled(&reference, false, &arm64.manifest_digest, &arm64.blobs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_cached_exports_every_cached_tag() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let exported = exported(&["--all-cached"]).await;
    let fixture = &exported.fixture;
    let found = entries(&exported.bundle);
    let bundle = json_entry(&found, "gantry-bundle.json");
    let mut images: Vec<(String, String, String)> = bundle["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| {
            (
                image["repository"].as_str().unwrap().to_owned(),
                image["tag"].as_str().unwrap().to_owned(),
                image["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    images.sort();
    assert_eq!(
        images,
        [
            (
                "test/index".to_owned(),
                "idx".to_owned(),
                fixture.index_digest.clone()
            ),
            (
                "test/multi".to_owned(),
                "v1".to_owned(),
                fixture.multi.manifest_digest.clone()
            ),
        ]
    );
    let mut content = vec![
        fixture.index_digest.clone(),
        fixture.multi.manifest_digest.clone(),
    ];
    content.extend(fixture.multi.blobs());
    for image in &fixture.platforms {
        content.push(image.manifest_digest.clone());
        content.extend(image.blobs());
    }
    for digest in &content {
        let entry = found
            .get(&blob_entry(digest))
            .unwrap_or_else(|| panic!("{digest} missing"));
        assert_eq!(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(entry))),
            *digest
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_load_and_ctr_import_read_bundles_of_an_index() {
    if !require_tools(DOCKER_TOOLS) {
        return;
    }
    let exported = exported(&["test/index:idx", "test/multi:v1"]).await;
    let fixture = &exported.fixture;
    let host = fixture.registry.host();
    let trap = Trap::start().await;
    let dockerd = Dockerd::start_with(&trap, DockerdSetup::default()).await;
    let load = dockerd
        .docker(&["load", "-i", exported.bundle.to_str().unwrap()])
        .await;
    assert!(load.ok, "{}\n{}", load.text(), dockerd.logs());
    // The index by its tag, as the linux/amd64 image (the classic image store keeps one
    // platform per tag); its image ID is that platform's config digest.
    let index = dockerd.inspect(&format!("{host}/test/index:idx")).await;
    assert_eq!(index["Id"], fixture.platforms[0].config_digest.as_str());
    let multi = dockerd.inspect(&format!("{host}/test/multi:v1")).await;
    assert_eq!(multi["Id"], fixture.multi.config_digest.as_str());

    // A bundle of nothing but an index, narrowed to arm64: loaded as the arm64 image.
    let arm64 = exported.work.path().join("arm64.tar");
    let output = gantry(&[
        "export",
        "--config",
        exported.a.path().join("gantry.yaml").to_str().unwrap(),
        "-o",
        arm64.to_str().unwrap(),
        "--platform",
        "linux/arm64",
        "test/index:idx",
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output));
    dockerd.remove(&format!("{host}/test/index:idx")).await;
    let load = dockerd
        .docker(&["load", "-i", arm64.to_str().unwrap()])
        .await;
    assert!(load.ok, "{}\n{}", load.text(), dockerd.logs());
    let index = dockerd.inspect(&format!("{host}/test/index:idx")).await;
    assert_eq!(index["Id"], fixture.platforms[1].config_digest.as_str());

    // containerd's import (what `docker load` runs on the containerd image store, which this
    // dockerd does not have) names images by `io.containerd.image.name`, every platform kept.
    let import = dockerd
        .containerd
        .ctr(
            &[
                "images",
                "import",
                "--all-platforms",
                exported.bundle.to_str().unwrap(),
            ],
            &trap,
        )
        .await;
    assert!(import.ok, "{}", import.text());
    for (name, digest) in [
        ("test/index:idx", &fixture.index_digest),
        ("test/multi:v1", &fixture.multi.manifest_digest),
    ] {
        let reference = format!("{host}/{name}");
        assert_eq!(
            dockerd
                .containerd
                .image_digest(&reference, &trap)
                .await
                .as_deref(),
            Some(digest.as_str()),
            "{reference}"
        );
    }
    trap.assert_untouched("docker load, ctr import");
}

/// Where the object tier keeps a digest: `<kind>/sha256/<2 hex>/<hex>` (no key prefix).
fn object_key(kind: &str, digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("{kind}/sha256/{}/{hex}", &hex[..2])
}

/// With `storage.s3`, import fills the object tier too: every blob and manifest of the bundle is
/// in the bucket afterwards (a second import uploads nothing), and a replica with an empty disk
/// over the same bucket pulls the image without a single upstream blob GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_with_an_object_tier_uploads_the_bundle_there() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let Some(garage) = common::garage::Garage::start().await else {
        return;
    };
    let exported = exported(&["test/multi:v1"]).await;
    let storage = garage.yaml();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gantry.yaml");
    let options = Options {
        storage: &storage,
        ..Options::default()
    };
    std::fs::write(
        &config,
        config_yaml(dir.path(), &exported.upstream, options),
    )
    .unwrap();
    let args = [
        "import",
        "--config",
        config.to_str().unwrap(),
        exported.bundle.to_str().unwrap(),
    ];
    let import = || gantry(&args);
    let multi = &exported.fixture.multi;
    let blobs = multi.blobs();
    let output = import().await;
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains(&format!(
            "object tier: {} blobs and manifests uploaded",
            blobs.len() + 1
        )),
        "{}",
        text(&output)
    );
    for blob in &blobs {
        let object = garage.object(&object_key("blobs", blob)).await;
        let object = object.unwrap_or_else(|| panic!("{blob} is not in the bucket"));
        assert_eq!(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&object))),
            *blob
        );
    }
    assert!(garage
        .object(&object_key("manifests", &multi.manifest_digest))
        .await
        .is_some());
    let again = import().await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("object tier: 0 blobs and manifests uploaded"),
        "{}",
        text(&again)
    );

    // Another replica over the bucket, with its own empty disk and the counting proxy upstream.
    let replica = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &exported.fixture.proxy.url(),
        Options {
            storage: &storage,
            ..Options::default()
        },
    )
    .await;
    assert_pulled(
        &format!("{}/test/multi:v1", replica.host()),
        false,
        &multi.manifest_digest,
        &blobs,
    )
    .await;
    replica.settled().await;
    assert!(
        exported.fixture.proxy.blob_gets().is_empty(),
        "every blob came from the object tier: {:?}",
        exported.fixture.proxy.blob_gets()
    );
    replica.stop().await;
}
