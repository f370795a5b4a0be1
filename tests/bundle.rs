//! `gantry export` and `gantry import` as the real commands, between two stores: mirror A pulls
//! from a real upstream and exports; skopeo and podman read the bundle; B, `offline: true` and
//! whose upstream is gone, imports it and serves it by tag to skopeo, podman and ctr with the
//! upstream's digests, and answers a tag it never saw with the offline 404. Damaged bundles are
//! refused naming the entry, with B's store byte for byte unchanged, and an import into a store a
//! gantry process serves is refused with exit 2.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::clients::{registries_conf, Containerd, Podman, Trap};
use common::process::GantryProcess;
use common::{config_yaml, file_digest, pull, require_tools, skopeo, Fixture, Gantry, Options};
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
    _a: TempDir,
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
        _a: a_dir,
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
        _a,
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
    let b_config = write_config(b_dir.path(), &upstream);
    let output = gantry(&[
        "import",
        "--config",
        b_config.to_str().unwrap(),
        bundle.to_str().unwrap(),
    ])
    .await;
    assert!(output.status.success(), "import failed:\n{}", text(&output));

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
    let (pulled, result) = pull(&format!("{}/test/index@{index_digest}", b.host()), true).await;
    result.unwrap_or_else(|e| panic!("pull through B: {e}"));
    assert_eq!(
        file_digest(&pulled.path().join("image/manifest.json")),
        index_digest
    );
    for blob in platforms.iter().flat_map(|p| p.blobs()) {
        let copied = pulled
            .path()
            .join("image")
            .join(blob.trim_start_matches("sha256:"));
        assert_eq!(file_digest(&copied), blob);
    }
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
