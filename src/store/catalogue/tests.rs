use std::time::Duration;

use super::*;

fn digest(n: u32) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).unwrap()
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn journal_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(JOURNAL))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn what_is_recorded_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (tags, recorded) = {
        let catalogue = Catalogue::open(dir.path()).unwrap();
        catalogue.record_tag("docker.io", "library/alpine", "3.20", &digest(1), INDEX);
        catalogue.record_tag("docker.io", "library/alpine", "edge", &digest(2), MANIFEST);
        catalogue.record_tag("docker.io", "library/redis", "7", &digest(3), MANIFEST);
        catalogue.record_tag("ghcr.io", "owner/app", "v1", &digest(4), MANIFEST);
        catalogue.forget_tag("ghcr.io", "owner/app", "v1");
        catalogue.record_manifest(
            &digest(2),
            MANIFEST,
            500,
            &[(digest(10), 7), (digest(11), 9)],
        );
        catalogue.record_manifest(&digest(3), MANIFEST, 600, &[(digest(12), 8)]);
        catalogue.forget_manifest(&digest(3));
        assert_eq!(catalogue.dropped_lines(), 0);
        (
            catalogue.tags(),
            catalogue.tags_for("docker.io", "library/alpine"),
        )
    };
    assert_eq!(tags.len(), 3);
    assert_eq!(
        recorded.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(),
        ["3.20", "edge"]
    );

    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert_eq!(
        catalogue.tags(),
        tags,
        "tags, digests, media types and times survive"
    );
    assert_eq!(catalogue.tags_for("docker.io", "library/alpine"), recorded);
    assert!(
        catalogue.tags_for("ghcr.io", "owner/app").is_empty(),
        "a forgotten tag stays forgotten"
    );
    assert_eq!(
        catalogue.manifest(&digest(2)),
        Some(ManifestRecord {
            digest: digest(2),
            media_type: MANIFEST.into(),
            size: 500,
            references: vec![(digest(10), 7), (digest(11), 9)],
        })
    );
    assert_eq!(
        catalogue.manifest(&digest(3)),
        None,
        "a forgotten manifest stays forgotten"
    );

    // A tag moving to another digest is a new record; the same answer again changes nothing.
    catalogue.record_tag("docker.io", "library/alpine", "3.20", &digest(1), INDEX);
    assert_eq!(catalogue.tags(), tags);
    catalogue.record_tag("docker.io", "library/alpine", "3.20", &digest(5), INDEX);
    assert_eq!(
        catalogue.tags_for("docker.io", "library/alpine")[0].digest,
        digest(5)
    );
}

#[test]
fn a_torn_last_line_is_cut_and_the_journal_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let catalogue = Catalogue::open(dir.path()).unwrap();
        catalogue.record_tag("docker.io", "library/alpine", "3.20", &digest(1), INDEX);
    }
    let mut journal = std::fs::read(dir.path().join(JOURNAL)).unwrap();
    journal.extend_from_slice(br#"{"op":"tag","registry":"docker.io","repos"#);
    std::fs::write(dir.path().join(JOURNAL), &journal).unwrap();

    {
        let catalogue = Catalogue::open(dir.path()).unwrap();
        assert_eq!(
            catalogue.tags().len(),
            1,
            "the lines before the torn one count"
        );
        catalogue.record_tag("docker.io", "library/alpine", "edge", &digest(2), MANIFEST);
    }
    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert_eq!(
        catalogue
            .tags()
            .iter()
            .map(|t| t.tag.as_str())
            .collect::<Vec<_>>(),
        ["3.20", "edge"],
        "the line written after the cut is not glued to the torn one"
    );
    for line in journal_lines(dir.path()) {
        serde_json::from_str::<serde_json::Value>(&line).unwrap();
    }
}

#[test]
fn a_long_journal_is_compacted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let changes = 2 * (COMPACT_FACTOR * 2 + COMPACT_SLACK);
    {
        let catalogue = Catalogue::open(dir.path()).unwrap();
        catalogue.record_manifest(&digest(9), MANIFEST, 42, &[(digest(10), 1)]);
        for n in 0..changes {
            // The tag moves back and forth: every change is a line, one entry stays live.
            let to = digest(1 + (n % 2) as u32);
            catalogue.record_tag("docker.io", "library/alpine", "latest", &to, MANIFEST);
        }
    }
    assert_eq!(journal_lines(dir.path()).len(), changes + 1);

    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert_eq!(
        journal_lines(dir.path()).len(),
        2,
        "one line per live entry"
    );
    assert!(!dir.path().join(COMPACTING).exists());
    let tags = catalogue.tags();
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].digest, digest(1 + ((changes - 1) % 2) as u32));
    assert_eq!(catalogue.manifest(&digest(9)).unwrap().size, 42);
}

#[test]
fn a_full_queue_drops_lines_without_waiting_and_the_journal_heals() {
    let dir = tempfile::tempdir().unwrap();
    let (release, hold) = std::sync::mpsc::channel();
    let catalogue = Arc::new(Catalogue::open_with(dir.path(), 4, Some(hold), PULL_FLUSH).unwrap());

    // The writer is held, so only 4 lines fit; the other 96 records must not wait for it.
    let (done, finished) = std::sync::mpsc::channel();
    let recorder = {
        let catalogue = Arc::clone(&catalogue);
        std::thread::spawn(move || {
            for n in 0..100 {
                catalogue.record_tag(
                    "docker.io",
                    "team/app",
                    &format!("v{n}"),
                    &digest(n),
                    MANIFEST,
                );
            }
            done.send(()).unwrap();
        })
    };
    // A bound for reporting a hang as a failure, not a synchronization.
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("recording never waits for the writer");
    recorder.join().unwrap();
    assert_eq!(catalogue.dropped_lines(), 96);
    assert_eq!(catalogue.tags().len(), 100, "memory keeps every record");

    release.send(()).unwrap();
    drop(Arc::into_inner(catalogue).unwrap());
    let reopened = Catalogue::open(dir.path()).unwrap();
    assert_eq!(
        reopened.tags().len(),
        100,
        "the writer rewrote the journal from memory after the drops"
    );
}

#[test]
fn unknown_lines_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(JOURNAL),
        concat!(
            r#"{"op":"pin","digest":"sha256:00"}"#,
            "\n",
            r#"{"op":"forget_manifest","digest":"not a digest"}"#,
            "\n",
        ),
    )
    .unwrap();
    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert!(catalogue.tags().is_empty());
    catalogue.record_tag("docker.io", "library/alpine", "3.20", &digest(1), INDEX);
    drop(catalogue);
    assert_eq!(Catalogue::open(dir.path()).unwrap().tags().len(), 1);
}

#[test]
fn pulls_are_counted_in_memory_and_written_at_close() {
    let dir = tempfile::tempdir().unwrap();
    {
        let catalogue = Catalogue::open(dir.path()).unwrap();
        catalogue.record_manifest(&digest(1), MANIFEST, 10, &[]);
        catalogue.record_manifest(&digest(2), MANIFEST, 10, &[]);
        for _ in 0..3 {
            catalogue.record_pull(&digest(1));
        }
        catalogue.record_pull(&digest(2));
        catalogue.record_pull(&digest(99));
        assert_eq!(catalogue.pulls(&digest(1)).unwrap().count, 3);
        assert!(
            catalogue.pulls(&digest(99)).is_none(),
            "a manifest the catalogue does not hold is not counted"
        );
        let last = catalogue.pulls(&digest(2)).unwrap().last;
        let age = SystemTime::now().duration_since(last).unwrap();
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert!(
            !journal_lines(dir.path())
                .iter()
                .any(|l| l.contains("pulls")),
            "nothing is written on the request path"
        );
    }
    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert_eq!(catalogue.pulls(&digest(1)).unwrap().count, 3);
    assert_eq!(catalogue.pulls(&digest(2)).unwrap().count, 1);
    catalogue.record_pull(&digest(1));
    catalogue.forget_manifest(&digest(2));
    assert!(catalogue.pulls(&digest(2)).is_none(), "a purge resets them");
    drop(catalogue);
    let catalogue = Catalogue::open(dir.path()).unwrap();
    assert_eq!(catalogue.pulls(&digest(1)).unwrap().count, 4);
    assert!(catalogue.pulls(&digest(2)).is_none());
}

#[test]
fn pulls_reach_the_journal_within_the_flush_interval_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let catalogue =
        Catalogue::open_with(dir.path(), QUEUE, None, Duration::from_millis(50)).unwrap();
    catalogue.record_manifest(&digest(1), MANIFEST, 10, &[]);
    catalogue.record_pull(&digest(1));
    catalogue.record_pull(&digest(1));
    // Waits for the writer's line (the event), bounded so a writer that never writes fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let written = loop {
        let pulls: Vec<String> = journal_lines(dir.path())
            .into_iter()
            .filter(|l| l.contains(r#""op":"pulls""#))
            .collect();
        if !pulls.is_empty() || std::time::Instant::now() > deadline {
            break pulls;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].contains(r#""count":2"#), "{written:?}");
    // Compaction keeps them: the journal is rewritten from memory.
    drop(catalogue);
    let state = replay(&dir.path().join(JOURNAL)).unwrap().0;
    rewrite(dir.path(), &state).unwrap();
    let reopened = Catalogue::open(dir.path()).unwrap();
    assert_eq!(reopened.pulls(&digest(1)).unwrap().count, 2);
}
