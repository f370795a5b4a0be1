use std::sync::Arc;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use super::*;
use crate::oci::Digest;

/// Published vectors (FIPS 180-2 examples and the empty message), so no expected digest comes
/// from the hasher under test.
const SHA256_EMPTY: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const SHA256_ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const SHA512_ABC: &str = "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                          2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";

/// sha256 of `content` straight from the sha2 crate, not through `Digest::of`/`DigestHasher`.
fn sha256(content: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest::parse(&format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(content))
    ))
    .unwrap()
}

fn open(dir: &Path, max: Option<u64>) -> Arc<Store> {
    let options = StoreOptions {
        max_size: max,
        map_files: true,
    };
    Store::open(dir, options, Arc::new(Metrics::new())).unwrap()
}

async fn put_blob(store: &Arc<Store>, content: &[u8]) -> Digest {
    let digest = sha256(content);
    let mut writer = store
        .begin_blob(&digest, Some(content.len() as u64))
        .unwrap();
    // Small chunks for small contents (odd sizes are the interesting case), ~100 for large ones.
    for chunk in content.chunks((content.len() / 100).max(7)) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    writer.commit().await.unwrap();
    digest
}

async fn read_all(store: &Arc<Store>, digest: &Digest) -> Vec<u8> {
    let blob = store.open_blob(digest).await.expect("blob present");
    let size = blob.size;
    BlobBody::new(blob, 0, size)
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

fn tmp_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
}

#[tokio::test]
async fn commits_verified_blobs_and_reads_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let digest = put_blob(&store, b"hello, layer").await;
    assert_eq!(read_all(&store, &digest).await, b"hello, layer");
    let hex = digest.hex();
    assert!(dir
        .path()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]))
        .is_file());
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn known_vectors_commit_and_anything_else_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    for (digest, content) in [
        (SHA256_EMPTY, &b""[..]),
        (SHA256_ABC, b"abc"),
        (SHA512_ABC, b"abc"),
    ] {
        let digest = Digest::parse(digest).unwrap();
        assert_eq!(Digest::of(digest.algorithm(), content), digest);
        for wrong in [&b"abd"[..], b"ab", b"abcabc"] {
            let mut writer = store.begin_blob(&digest, None).unwrap();
            writer.write(Bytes::copy_from_slice(wrong)).await.unwrap();
            assert!(
                matches!(
                    writer.commit().await,
                    Err(StoreError::DigestMismatch { .. })
                ),
                "{wrong:?} committed as {digest}"
            );
        }
        // In two chunks where there are two bytes to split, as a download writes them.
        let mut writer = store
            .begin_blob(&digest, Some(content.len() as u64))
            .unwrap();
        let (head, tail) = content.split_at(content.len().min(1));
        writer.write(Bytes::copy_from_slice(head)).await.unwrap();
        writer.write(Bytes::copy_from_slice(tail)).await.unwrap();
        writer.commit().await.unwrap();
        assert_eq!(read_all(&store, &digest).await, content);
        let hex = digest.hex();
        assert!(dir
            .path()
            .join(format!(
                "blobs/{}/{}/{hex}",
                digest.algorithm().as_str(),
                &hex[..2]
            ))
            .is_file());
    }
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn a_digest_or_size_mismatch_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let claimed = sha256(b"the real content");

    let mut writer = store.begin_blob(&claimed, None).unwrap();
    writer
        .write(Bytes::from_static(b"corrupted content"))
        .await
        .unwrap();
    assert!(matches!(
        writer.commit().await,
        Err(StoreError::DigestMismatch { .. })
    ));

    let mut writer = store.begin_blob(&claimed, Some(16)).unwrap();
    writer.write(Bytes::from_static(b"the real")).await.unwrap();
    assert!(matches!(
        writer.commit().await,
        Err(StoreError::SizeMismatch { .. })
    ));

    let writer = store.begin_blob(&claimed, None).unwrap();
    drop(writer);

    assert!(store.open_blob(&claimed).await.is_none());
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn manifests_keep_their_media_type_and_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let bytes = Bytes::from_static(b"{\"schemaVersion\":2,  \"odd\" : \"spacing\"}\n");
    let digest = sha256(&bytes);
    store
        .write_manifest(
            &digest,
            "application/vnd.oci.image.manifest.v1+json",
            bytes.clone(),
        )
        .await
        .unwrap();
    let stored = store.read_manifest(&digest).await.unwrap();
    assert_eq!(
        stored.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(stored.bytes, bytes);
    let wrong = Digest::parse(SHA256_ABC).unwrap();
    assert!(store.write_manifest(&wrong, "x", bytes).await.is_err());
    assert!(store.read_manifest(&wrong).await.is_none());
}

#[tokio::test]
async fn evicts_least_recently_used_but_never_a_leased_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(250));
    let a = put_blob(&store, &[b'a'; 100]).await;
    let b = put_blob(&store, &[b'b'; 100]).await;
    // Reading `a` makes `b` the least recently used, and the lease keeps `a` while it is read.
    let lease_a = store.open_blob(&a).await.unwrap();
    let c = put_blob(&store, &[b'c'; 100]).await;
    assert!(store.contains_blob(&a));
    assert!(!store.contains_blob(&b), "b was least recently used");
    assert!(store.contains_blob(&c));
    assert!(store.usage().0 <= 250);

    // While `a` is leased, a new entry evicts `c` even though `a` is older.
    let d = put_blob(&store, &[b'd'; 100]).await;
    assert!(store.contains_blob(&a), "a leased entry is never evicted");
    assert!(!store.contains_blob(&c));
    drop(lease_a);
    let e = put_blob(&store, &[b'e'; 100]).await;
    assert!(
        !store.contains_blob(&a),
        "once released, the oldest goes first"
    );
    assert!(store.contains_blob(&d) && store.contains_blob(&e));
}

#[tokio::test]
async fn repository_links_leave_with_their_blob_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(250));
    let a = put_blob(&store, &[b'a'; 100]).await;
    let b = put_blob(&store, &[b'b'; 100]).await;
    store.link(vec![a.clone()], "docker.io/team/one").await;
    store.link(vec![b.clone()], "docker.io/team/two").await;
    assert!(store.is_linked(&a, "docker.io", "team/one"));
    assert!(!store.is_linked(&a, "docker.io", "team/two"));
    // `a` is least recently used: a third blob evicts it, and its link with it, file and all.
    let c = put_blob(&store, &[b'c'; 100]).await;
    assert!(!store.contains_blob(&a));
    assert!(!store.is_linked(&a, "docker.io", "team/one"));
    assert!(!dir
        .path()
        .join("links/sha256")
        .join(&a.hex()[..2])
        .join(a.hex())
        .exists());
    drop(store);
    let store = open(dir.path(), Some(250));
    assert!(
        store.is_linked(&b, "docker.io", "team/two"),
        "links survive a restart"
    );
    assert!(!store.is_linked(&c, "docker.io", "team/two"));
}

/// A store written before links existed keeps serving its entries (offline pulls of an upgraded
/// mirror), under any repository, until they leave it; content added after is scoped.
#[tokio::test]
async fn a_store_from_before_links_serves_its_entries_under_any_repository() {
    let dir = tempfile::tempdir().unwrap();
    let old = put_blob(&open(dir.path(), None), b"cached by an older gantry").await;
    std::fs::remove_dir_all(dir.path().join("links")).unwrap();
    let store = open(dir.path(), None);
    assert!(store.is_linked(&old, "docker.io", "any/repository"));
    let new = put_blob(&store, b"cached after the upgrade").await;
    assert!(!store.is_linked(&new, "docker.io", "any/repository"));
    drop(store);
    let store = open(dir.path(), None);
    assert!(
        store.is_linked(&old, "docker.io", "another/repository"),
        "kept across restarts"
    );
    assert!(!store.is_linked(&new, "docker.io", "any/repository"));
}

#[tokio::test]
async fn reopening_rebuilds_the_index_and_empties_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let digest = {
        let store = open(dir.path(), None);
        let digest = put_blob(&store, b"survives a restart").await;
        std::fs::write(dir.path().join("tmp/leftover-from-a-crash"), b"partial").unwrap();
        digest
    };
    let store = open(dir.path(), None);
    assert!(tmp_is_empty(dir.path()));
    assert_eq!(read_all(&store, &digest).await, b"survives a restart");
    assert_eq!(store.usage(), (18, 1));
}

#[tokio::test]
async fn verify_all_removes_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let good = put_blob(&store, b"good").await;
    let bad = put_blob(&store, b"will be damaged").await;
    std::fs::write(store.path(Kind::Blob, &bad), b"damaged on disk").unwrap();
    let report = store.verify_all().unwrap();
    assert_eq!(report.entries, 1);
    assert_eq!(report.removed, vec![(Kind::Blob, bad.clone())]);
    assert!(store.contains_blob(&good));
    assert!(!store.contains_blob(&bad));
}

#[tokio::test]
async fn file_chunks_serve_exact_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (file, content) = patterned_file(dir.path(), 3_000_000);
    for (start, end) in [
        (0, 3_000_000),
        (5, 6),
        (1_048_570, 2_100_000),
        (2_999_999, 3_000_000),
    ] {
        let body = FileChunks::new(Arc::clone(&file), start, end, None);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            &bytes[..],
            &content[start as usize..end as usize],
            "{start}-{end}"
        );
    }
    let past_the_end = FileChunks::new(file, 2_999_000, 3_000_100, None);
    assert!(
        past_the_end.collect().await.is_err(),
        "a short file is an error, never a short body"
    );
}

fn patterned_file(dir: &Path, len: u32) -> (Arc<File>, Vec<u8>) {
    let path = dir.join("f");
    let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    (Arc::new(File::open(&path).unwrap()), content)
}

#[tokio::test]
async fn mapped_chunks_serve_exact_ranges_in_bounded_windows() {
    use super::mapped::{MappedChunks, MAP_WINDOW};
    let dir = tempfile::tempdir().unwrap();
    let (file, content) = patterned_file(dir.path(), 5 << 20);
    let window = MAP_WINDOW as u64;
    for (start, end) in [
        (0, 5 << 20),
        (5, 6),
        (window - 3, 2 * window + 5),
        ((5 << 20) - 1, 5 << 20),
        (7, 7),
    ] {
        let mut body = MappedChunks::new(Arc::clone(&file), start, end).unwrap();
        let mut received = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= MAP_WINDOW, "one window at a time");
            received.extend_from_slice(&data);
        }
        assert!(body.is_end_stream());
        assert_eq!(
            received,
            &content[start as usize..end as usize],
            "{start}-{end}"
        );
    }
}

#[tokio::test]
async fn a_blob_file_shorter_than_its_size_fails_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let digest = put_blob(&store, &[7u8; 100_000]).await;
    let blob = store.open_blob(&digest).await.unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(store.path(Kind::Blob, &digest))
        .unwrap()
        .set_len(50_000)
        .unwrap();
    let size = blob.size;
    assert!(
        BlobBody::new(blob, 0, size).collect().await.is_err(),
        "a damaged file is an error, never a short body"
    );
}

#[tokio::test]
async fn a_body_survives_its_file_being_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let content: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 253) as u8).collect();
    let digest = put_blob(&store, &content).await;
    let blob = store.open_blob(&digest).await.unwrap();
    let size = blob.size;
    let mut body = BlobBody::new(blob, 0, size);
    let mut received = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();
    std::fs::remove_file(store.path(Kind::Blob, &digest)).unwrap();
    while let Some(frame) = body.frame().await {
        received.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(received, content);
}

#[tokio::test]
async fn windows_not_in_the_page_cache_are_read_in_off_the_runtime() {
    use super::mapped::{evict_from_page_cache, map_unadvised, resident, MappedChunks};
    let dir = tempfile::tempdir().unwrap();
    let (file, content) = patterned_file(dir.path(), 5 << 20);
    file.sync_all().unwrap();
    // The residency probe, on a window that starts off a page boundary.
    let window = map_unadvised(&file, 3, 1 << 20);
    assert!(resident(&window), "just written");
    assert!(evict_from_page_cache(&file), "posix_fadvise(DONTNEED)");
    assert!(!resident(&window), "evicted");
    drop(window);
    let body = MappedChunks::new(Arc::clone(&file), 3, 5 << 20).unwrap();
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], &content[3..]);
}

#[tokio::test]
async fn small_blobs_stay_mapped_between_requests_until_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(1_500_000));
    let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
    let small = put_blob(&store, &content).await;
    assert!(!store.small_blob_maps.contains_key(&small));
    assert_eq!(read_all(&store, &small).await, content);
    assert!(store.small_blob_maps.contains_key(&small), "mapped once");
    assert_eq!(read_all(&store, &small).await, content, "and served again");
    let blob = store.open_blob(&small).await.unwrap();
    let ranged = BlobBody::new(blob, 999_990, 1_000_000)
        .collect()
        .await
        .unwrap();
    assert_eq!(&ranged.to_bytes()[..], &content[999_990..]);

    // A second blob that does not fit with it evicts it, and its mapping with it.
    let other = put_blob(&store, &[9u8; 900_000]).await;
    assert!(!store.contains_blob(&small));
    assert!(!store.small_blob_maps.contains_key(&small));
    assert_eq!(read_all(&store, &other).await, vec![9u8; 900_000]);
}

#[tokio::test]
async fn with_mapping_off_blobs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_size: None,
        map_files: false,
    };
    let store = Store::open(dir.path(), options, Arc::new(Metrics::new())).unwrap();
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 233) as u8).collect();
    let digest = put_blob(&store, &content).await;
    let blob = store.open_blob(&digest).await.unwrap();
    let body = BlobBody::new(blob, 0, content.len() as u64);
    assert!(
        matches!(body, BlobBody::Read(_)),
        "storage.mmap: false reads"
    );
    assert_eq!(&body.collect().await.unwrap().to_bytes()[..], &content[..]);
    assert!(!store.small_blob_maps.contains_key(&digest));
}

#[tokio::test]
async fn a_fresh_store_gets_its_layout_file() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path(), None);
    assert_eq!(
        std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).unwrap(),
        "gantry store layout 1\n"
    );
    assert!(
        tmp_is_empty(dir.path()),
        "the staged layout file was renamed"
    );
}

#[tokio::test]
async fn a_store_without_a_layout_file_is_adopted_as_layout_1() {
    let dir = tempfile::tempdir().unwrap();
    let digest = {
        let store = open(dir.path(), None);
        put_blob(&store, b"written before the layout file").await
    };
    std::fs::remove_file(dir.path().join(LAYOUT_FILE)).unwrap();
    let store = open(dir.path(), None);
    assert_eq!(
        read_all(&store, &digest).await,
        b"written before the layout file"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).unwrap(),
        "gantry store layout 1\n"
    );
}

#[tokio::test]
async fn an_unknown_layout_is_refused_and_nothing_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let digest = {
        let store = open(dir.path(), None);
        put_blob(&store, b"kept as it is").await
    };
    std::fs::write(dir.path().join(LAYOUT_FILE), "gantry store layout 2\n").unwrap();
    let leftover = dir.path().join("tmp/a-newer-gantry's-download");
    std::fs::write(&leftover, b"partial").unwrap();
    let refused = Store::open(
        dir.path(),
        StoreOptions::default(),
        Arc::new(Metrics::new()),
    );
    let message = match refused {
        Err(error @ StoreError::UnknownLayout { .. }) => error.to_string(),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a store of layout 2 was opened"),
    };
    assert!(
        message.contains("storage.path")
            && message.contains(&dir.path().display().to_string())
            && message.contains("\"2\""),
        "{message}"
    );
    assert!(leftover.exists(), "tmp/ is left as it was");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).unwrap(),
        "gantry store layout 2\n"
    );
    let hex = digest.hex();
    assert!(dir
        .path()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]))
        .is_file());
}

/// Every file under `blobs/` and `manifests/`, by digest hex.
fn files_under(dir: &Path, kind: &str) -> Vec<String> {
    let mut found = Vec::new();
    let root = dir.join(kind);
    for algorithm in std::fs::read_dir(&root).unwrap().flatten() {
        for prefix in std::fs::read_dir(algorithm.path()).unwrap().flatten() {
            for entry in std::fs::read_dir(prefix.path()).unwrap().flatten() {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

fn hexes(digests: &[&Digest]) -> Vec<String> {
    let mut hexes: Vec<String> = digests.iter().map(|d| d.hex().to_owned()).collect();
    hexes.sort();
    hexes
}

const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Stores a manifest (its bytes name `references`, so each digest is distinct) and records it
/// in the catalogue as the mirror does.
async fn put_manifest(store: &Arc<Store>, media_type: &str, references: &[&Digest]) -> Digest {
    let text = format!(
        "{{\"mediaType\":\"{media_type}\",\"refs\":{:?}}}",
        references.iter().map(|d| d.to_string()).collect::<Vec<_>>()
    );
    let digest = sha256(text.as_bytes());
    store
        .write_manifest(&digest, media_type, Bytes::from(text.clone()))
        .await
        .unwrap();
    let references: Vec<(Digest, u64)> = references.iter().map(|d| ((*d).clone(), 1)).collect();
    store
        .catalogue()
        .record_manifest(&digest, media_type, text.len() as u64, &references);
    digest
}

#[tokio::test]
async fn a_purge_removes_a_manifest_and_the_blobs_only_it_references_and_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let (config_a, only_a, both, config_b) = (
        put_blob(&store, b"config a").await,
        put_blob(&store, &[b'a'; 3000]).await,
        put_blob(&store, &[b's'; 2000]).await,
        put_blob(&store, b"config b").await,
    );
    let a = put_manifest(&store, IMAGE, &[&config_a, &only_a, &both]).await;
    let b = put_manifest(&store, IMAGE, &[&config_b, &both]).await;
    store
        .link(
            vec![a.clone(), only_a.clone(), both.clone()],
            "docker.io/team/a",
        )
        .await;
    assert!(store.pin(std::slice::from_ref(&only_a)).unwrap() == 1);
    store.catalogue().record_pull(&a);
    // A client is being sent `only_a` while it is purged: it must still get every byte.
    let reading = store.open_blob(&only_a).await.unwrap();
    let (bytes_before, _) = store.usage();
    let manifest_file = dir
        .path()
        .join("manifests/sha256")
        .join(&a.hex()[..2])
        .join(a.hex());
    let manifest_bytes = std::fs::metadata(&manifest_file).unwrap().len();

    let purged = store.purge(std::slice::from_ref(&a), None).await;
    assert_eq!(purged.manifests, vec![a.clone()]);
    let mut removed = vec![config_a.clone(), only_a.clone()];
    removed.sort();
    assert_eq!(purged.blobs, removed);
    assert_eq!(purged.shared, vec![both.clone()], "b still references it");
    assert_eq!(bytes_before - store.usage().0, purged.bytes);
    assert_eq!(purged.bytes, 3000 + 8 + manifest_bytes);

    assert_eq!(files_under(dir.path(), "blobs"), hexes(&[&both, &config_b]));
    assert_eq!(files_under(dir.path(), "manifests"), hexes(&[&b]));
    assert!(!dir
        .path()
        .join("links/sha256")
        .join(&only_a.hex()[..2])
        .join(only_a.hex())
        .exists());
    assert!(!store.is_linked(&only_a, "docker.io", "team/a"));
    assert!(
        store.is_linked(&both, "docker.io", "team/a"),
        "kept content keeps its links"
    );
    assert!(store.catalogue().manifest(&a).is_none());
    assert!(
        store.catalogue().pulls(&a).is_none(),
        "pull counts leave with it"
    );
    assert!(store.catalogue().manifest(&b).is_some());
    assert!(store.open_blob(&only_a).await.is_none());
    assert!(
        store.read_manifest(&a).await.is_none(),
        "not even from the hot cache"
    );
    assert!(
        !store.pins().contains(&only_a),
        "purged content is unpinned"
    );
    assert!(store.read_manifest(&b).await.is_some());

    let size = reading.size;
    let body = BlobBody::new(reading, 0, size)
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        &body[..],
        &[b'a'; 3000][..],
        "a reader finishes from its open file"
    );

    // Reopened, nothing comes back: not the index, not the catalogue, not the pin.
    drop(store);
    let store = open(dir.path(), None);
    assert!(!store.contains_blob(&only_a));
    assert!(store.catalogue().manifest(&a).is_none());
    assert!(!store.pins().contains(&only_a));
}

#[tokio::test]
async fn purging_an_index_takes_its_children_unless_another_index_references_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let (l1, l2, l3) = (
        put_blob(&store, b"layer one").await,
        put_blob(&store, b"layer two").await,
        put_blob(&store, b"layer three").await,
    );
    let amd64 = put_manifest(&store, IMAGE, &[&l1]).await;
    let arm64 = put_manifest(&store, IMAGE, &[&l2, &l3]).await;
    let index = put_manifest(&store, INDEX, &[&amd64, &arm64]).await;
    // Another index (another tag's) shares the arm64 child.
    let other = put_manifest(&store, INDEX, &[&arm64]).await;

    let purged = store.purge(std::slice::from_ref(&index), None).await;
    let mut manifests = vec![index.clone(), amd64.clone()];
    manifests.sort();
    assert_eq!(purged.manifests, manifests);
    assert_eq!(purged.blobs, vec![l1.clone()]);
    assert!(purged.shared.contains(&arm64));
    assert_eq!(
        files_under(dir.path(), "manifests"),
        hexes(&[&arm64, &other])
    );
    assert_eq!(files_under(dir.path(), "blobs"), hexes(&[&l2, &l3]));

    // Purging the other index now takes the shared child and its layers.
    let purged = store.purge(std::slice::from_ref(&other), None).await;
    assert_eq!(purged.blobs.len(), 2);
    assert!(files_under(dir.path(), "manifests").is_empty());
    assert!(files_under(dir.path(), "blobs").is_empty());
    assert_eq!(store.usage(), (0, 0));
}

#[tokio::test]
async fn a_blob_purged_while_it_downloads_is_discarded_at_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), None);
    let content = vec![b'd'; 10_000];
    let blob = sha256(&content);
    let manifest = put_manifest(&store, IMAGE, &[&blob]).await;
    let mut writer = store.begin_blob(&blob, Some(10_000)).unwrap();
    let follower = writer.reader().unwrap();
    writer
        .write(Bytes::copy_from_slice(&content[..4000]))
        .await
        .unwrap();

    let purged = store.purge(&[manifest], None).await;
    assert_eq!(purged.blobs, vec![blob.clone()]);
    assert!(writer.discarded());
    writer
        .write(Bytes::copy_from_slice(&content[4000..]))
        .await
        .unwrap();
    writer.verify().unwrap();
    writer.commit().await.expect("the download itself succeeds");
    assert!(
        !store.contains_blob(&blob),
        "but the store does not keep it"
    );
    assert!(files_under(dir.path(), "blobs").is_empty());
    assert!(tmp_is_empty(dir.path()));
    // A client following the download reads it whole from its handle.
    let read = read_exact_at(&follower, 0, 10_000).unwrap();
    assert_eq!(&read[..], &content[..]);

    // The next download of it is not affected by the old purge.
    assert_eq!(put_blob(&store, &content).await, blob);
    assert!(store.contains_blob(&blob));
}

#[tokio::test]
async fn pinned_entries_are_never_evicted_and_the_pins_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(250));
    let kept = put_blob(&store, &[b'k'; 100]).await;
    assert_eq!(store.pin(std::slice::from_ref(&kept)).unwrap(), 1);
    assert_eq!(
        store.pin(std::slice::from_ref(&kept)).unwrap(),
        0,
        "pinned already"
    );
    assert_eq!(store.pinned_bytes(), 100);
    for fill in b'a'..b'f' {
        put_blob(&store, &[fill; 100]).await;
        assert!(store.contains_blob(&kept), "evicted after {}", fill as char);
        assert!(store.usage().0 <= 250);
    }
    assert!(!dir.path().join("pins.tmp").exists());

    drop(store);
    let store = open(dir.path(), Some(250));
    assert!(store.pins().contains(&kept), "pins survive a restart");
    assert_eq!(store.pinned_bytes(), 100);
    put_blob(&store, &[b'x'; 100]).await;
    put_blob(&store, &[b'y'; 100]).await;
    assert!(store.contains_blob(&kept));

    // Pinned entries alone over the budget are kept (and logged), and new content is not.
    let big = put_blob(&store, &[b'p'; 200]).await;
    assert!(
        !store.contains_blob(&big),
        "it does not fit beside the pinned entry"
    );
    store.pin(std::slice::from_ref(&big)).unwrap();
    let again = put_blob(&store, &[b'p'; 200]).await;
    assert_eq!(again, big);
    assert!(store.contains_blob(&kept) && store.contains_blob(&big));
    assert_eq!(store.pinned_bytes(), 300);
    let other = put_blob(&store, &[b'q'; 10]).await;
    assert!(!store.contains_blob(&other));

    // Unpinned, it is an ordinary entry again and leaves to fit the budget.
    assert_eq!(store.unpin(std::slice::from_ref(&kept)).unwrap(), 1);
    assert!(!store.contains_blob(&kept));
    assert!(store.contains_blob(&big));
    drop(store);
    let store = open(dir.path(), Some(250));
    assert!(!store.pins().contains(&kept));
    assert!(store.pins().contains(&big));
}
