//! `gantry configure docker|containerd|podman` (the built binary): first each writer on files in
//! a temp dir (other keys kept, a second run changes nothing, a malformed file refused and left
//! as it was, `--dry-run` writes nothing), then the real clients started on the files it wrote
//! pull through a gantry in front of a real `docker-registry`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::clients::{Containerd, Dockerd, Hub, Podman, Trap, DOCKER_TOOLS};
use common::metrics::sample;
use common::{require_tools, Gantry};

/// `gantry configure ARGS…`: (exit code, stdout, stderr).
fn configure(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("configure")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `configure` must succeed; its stdout.
fn configured(args: &[&str]) -> String {
    let (code, stdout, stderr) = configure(args);
    assert_eq!(code, 0, "gantry configure {args:?}\n{stdout}\n{stderr}");
    stdout
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `args` a second time and checks it said "unchanged" and left `files` byte for byte.
fn assert_second_run_changes_nothing(args: &[&str], files: &[PathBuf]) {
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let stdout = configured(args);
    for (file, bytes) in files.iter().zip(before) {
        assert_eq!(
            std::fs::read(file).unwrap(),
            bytes,
            "the second run changed {}",
            file.display()
        );
        assert!(
            stdout.contains(&format!("{}: unchanged", file.display())),
            "the second run should say {} is unchanged:\n{stdout}",
            file.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The writers, on temp files

#[test]
fn docker_adds_the_mirror_and_keeps_every_other_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.json");
    std::fs::write(
        &path,
        "{\n    \"storage-driver\": \"overlay2\",\n    \"registry-mirrors\": [\"https://other.example\"],\n    \"log-opts\": {\"max-size\": \"10m\", \"a\": \"1\"},\n    \"debug\": true\n}\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = [
        "docker",
        "--mirror",
        "http://mirror.internal:5000",
        "--insecure",
        "--path",
        s(&path),
    ];
    let stdout = configured(&args);
    assert!(stdout.contains("updated"), "{stdout}");
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json["registry-mirrors"],
        serde_json::json!(["http://mirror.internal:5000", "https://other.example"]),
        "{text}"
    );
    assert_eq!(
        json["insecure-registries"],
        serde_json::json!(["mirror.internal:5000"])
    );
    assert_eq!(
        json["log-opts"],
        serde_json::json!({"max-size": "10m", "a": "1"})
    );
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "storage-driver",
            "registry-mirrors",
            "log-opts",
            "debug",
            "insecure-registries"
        ],
        "other keys keep their order:\n{text}"
    );
    assert!(
        text.contains("\n    \"storage-driver\""),
        "the file's indentation is kept:\n{text}"
    );
    let max_size = text.find("max-size").unwrap();
    assert!(
        max_size < text.find("\"a\"").unwrap(),
        "nested key order kept:\n{text}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the file's mode is kept"
    );
    assert_second_run_changes_nothing(&args, std::slice::from_ref(&path));
    // The same mirror written with a trailing slash is the same mirror.
    let slash = [
        "docker",
        "--mirror",
        "http://mirror.internal:5000/",
        "--insecure",
        "--path",
        s(&path),
    ];
    assert_second_run_changes_nothing(&slash, std::slice::from_ref(&path));
}

#[test]
fn docker_warns_that_it_mirrors_only_docker_hub() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.json");
    let (code, stdout, stderr) = configure(&[
        "docker",
        "--mirror",
        "https://mirror.example.com",
        "--registry",
        "ghcr.io",
        "--path",
        s(&path),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("created"), "{stdout}");
    assert!(
        stderr.contains("warning")
            && stderr.contains("only docker.io")
            && stderr.contains("ghcr.io"),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"registry-mirrors": ["https://mirror.example.com"]})
    );
}

#[test]
fn containerd_writes_one_hosts_toml_per_registry() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "not checked\n").unwrap();
    let args = [
        "containerd",
        "--mirror",
        "https://mirror.example.com:8443",
        "--registry",
        "docker.io",
        "--registry",
        "ghcr.io",
        "--insecure",
        "--ca",
        s(&ca),
        "--path",
        s(&certs),
    ];
    configured(&args);
    let hub = certs.join("docker.io/hosts.toml");
    let ghcr = certs.join("ghcr.io/hosts.toml");
    for (file, server) in [
        (&hub, "https://registry-1.docker.io"),
        (&ghcr, "https://ghcr.io"),
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some(server), "{text}");
        let host = &doc["host"]["https://mirror.example.com:8443"];
        let capabilities: Vec<&str> = host["capabilities"]
            .as_array()
            .unwrap_or_else(|| panic!("{text}"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(capabilities, ["pull", "resolve"], "{text}");
        assert_eq!(host["skip_verify"].as_bool(), Some(true), "{text}");
        assert_eq!(host["ca"].as_str(), Some(s(&ca)), "{text}");
    }
    assert_second_run_changes_nothing(&args, &[hub, ghcr]);
}

#[test]
fn podman_adds_mirrors_and_keeps_other_registries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registries.conf");
    let original = "unqualified-search-registries = [\"docker.io\"]\n\n# the team's own registry\n[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\nblocked = false\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"other.example:5000\"\n";
    std::fs::write(&path, original).unwrap();
    let args = [
        "podman",
        "--mirror",
        "http://mirror.internal:5000",
        "--insecure",
        "--registry",
        "docker.io",
        "--registry",
        "ghcr.io",
        "--path",
        s(&path),
    ];
    configured(&args);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("unqualified-search-registries = [\"docker.io\"]\n\n# the team's own registry\n[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\nblocked = false\n"),
        "other keys, tables and comments kept:\n{text}"
    );
    let doc: toml_edit::DocumentMut = text.parse().unwrap();
    let registries = doc["registry"].as_array_of_tables().unwrap();
    let mirrors_of = |prefix: &str| -> Vec<(String, Option<bool>)> {
        let table = registries
            .iter()
            .find(|t| t["prefix"].as_str() == Some(prefix))
            .unwrap_or_else(|| panic!("no [[registry]] {prefix}:\n{text}"));
        table["mirror"]
            .as_array_of_tables()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["location"].as_str().unwrap().to_owned(),
                    m.get("insecure").and_then(|i| i.as_bool()),
                )
            })
            .collect()
    };
    assert_eq!(
        mirrors_of("docker.io"),
        [
            ("mirror.internal:5000".to_owned(), Some(true)),
            ("other.example:5000".to_owned(), None)
        ],
        "gantry first, the other mirror kept:\n{text}"
    );
    assert_eq!(
        mirrors_of("ghcr.io"),
        [("mirror.internal:5000/ghcr.io".to_owned(), Some(true))],
        "{text}"
    );
    assert_eq!(registries.len(), 3, "{text}");
    assert_second_run_changes_nothing(&args, std::slice::from_ref(&path));
}

#[test]
fn malformed_files_are_refused_and_left_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = dir.path().join("daemon.json");
    let registries = dir.path().join("registries.conf");
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join("ghcr.io")).unwrap();
    let hosts = certs.join("ghcr.io/hosts.toml");
    let cases: [(&Path, &str, &[&str]); 4] = [
        (&daemon, "{\"debug\": true,\n", &["docker"]),
        (&daemon, "[\"registry-mirrors\"]\n", &["docker"]),
        (
            &registries,
            "[[registry]\nprefix = docker.io\n",
            &["podman", "--insecure"],
        ),
        // docker.io's file would be fine: nothing is written when any file is refused.
        (
            &hosts,
            "server = \"https://ghcr.io\n",
            &[
                "containerd",
                "--registry",
                "docker.io",
                "--registry",
                "ghcr.io",
            ],
        ),
    ];
    for (file, content, client) in cases {
        std::fs::write(file, content).unwrap();
        let path = if client[0] == "containerd" {
            &certs
        } else {
            file
        };
        let mut args = client.to_vec();
        args.extend(["--mirror", "http://mirror.internal:5000", "--path", s(path)]);
        let (code, stdout, stderr) = configure(&args);
        assert_eq!(code, 1, "{args:?} should fail\n{stdout}\n{stderr}");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains("left unchanged"),
            "the error names the file: {stderr}"
        );
        assert_eq!(std::fs::read_to_string(file).unwrap(), content, "{args:?}");
    }
    assert!(
        !certs.join("docker.io").exists(),
        "a refused hosts.toml stops the whole run"
    );
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 3, "no temp file left behind: {entries:?}");
}

#[test]
fn bad_flags_are_refused_before_anything_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.json");
    for (args, says) in [
        (
            vec!["docker", "--mirror", "mirror.internal:5000"],
            "http://",
        ),
        (
            vec!["docker", "--mirror", "ftp://mirror.internal"],
            "http://",
        ),
        (
            vec!["docker", "--mirror", "http://mirror.internal:5000/v2?x=1"],
            "path",
        ),
        (
            vec![
                "containerd",
                "--mirror",
                "http://m:5000",
                "--registry",
                "ghcr.io/x",
            ],
            "registry host",
        ),
        // podman's location has no scheme: plain HTTP needs `insecure = true`.
        (vec!["podman", "--mirror", "http://m:5000"], "--insecure"),
    ] {
        let mut args = args.clone();
        args.extend(["--path", s(&path)]);
        let (code, stdout, stderr) = configure(&args);
        assert_eq!(code, 64, "{args:?}\n{stdout}\n{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!path.exists(), "{args:?} wrote a file");
    }
}

#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.json");
    let original = "{\n  \"debug\": true\n}\n";
    std::fs::write(&path, original).unwrap();
    let stdout = configured(&[
        "docker",
        "--mirror",
        "http://mirror.internal:5000",
        "--dry-run",
        "--path",
        s(&path),
    ]);
    assert_eq!(
        stdout,
        format!(
            "--- {p}\n+++ {p}\n@@ -1,3 +1,6 @@\n {{\n-  \"debug\": true\n+  \"debug\": true,\n+  \"registry-mirrors\": [\n+    \"http://mirror.internal:5000\"\n+  ]\n }}\n",
            p = path.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    let certs = dir.path().join("certs.d");
    let stdout = configured(&[
        "containerd",
        "--mirror",
        "http://mirror.internal:5000",
        "--dry-run",
        "--path",
        s(&certs),
    ]);
    assert!(stdout.starts_with("--- /dev/null\n+++ "), "{stdout}");
    assert!(
        stdout.contains("+server = \"https://registry-1.docker.io\""),
        "{stdout}"
    );
    assert!(!certs.exists(), "--dry-run created {}", certs.display());
}

// ---------------------------------------------------------------------------------------------
// Real clients on the files `configure` wrote

/// Blob requests gantry answered for clients, from the store or upstream (with prefetch on, a
/// client's first request for a blob may find it already stored).
async fn blob_lookups(gantry: &Gantry) -> f64 {
    let metrics = gantry.metrics().await;
    ["hit", "miss"]
        .iter()
        .map(|outcome| {
            let name = format!("gantry_cache_lookups_total{{kind=\"blob\",outcome=\"{outcome}\"}}");
            sample(&metrics, &name).unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_gantry_with_the_hosts_toml_configure_wrote() {
    if !require_tools(&["docker-registry", "skopeo", "containerd", "ctr"]) {
        return;
    }
    let hub = Hub::start("library", 1300).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let mirror = format!("http://{}", gantry.host());
    let args = ["containerd", "--mirror", &mirror, "--path", s(&certs)];
    configured(&args);
    assert_second_run_changes_nothing(&args, &[certs.join("docker.io/hosts.toml")]);
    let containerd = Containerd::start().await;
    let reference = "docker.io/library/single:v1";
    let out = containerd
        .pull(
            &certs,
            &["--platform", "linux/amd64"],
            reference,
            &trap,
            &[&hub],
        )
        .await;
    assert_eq!(
        containerd.image_digest(reference, &trap).await.as_deref(),
        Some(hub.single.manifest_digest.as_str())
    );
    hub.assert_fetched_once(&hub.single.blobs(), &[], &out.text());
    assert!(blob_lookups(&gantry).await >= hub.single.blobs().len() as f64);
    trap.assert_untouched(&containerd.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_gantry_with_the_registries_conf_configure_wrote() {
    if !require_tools(&["docker-registry", "skopeo", "podman"]) {
        return;
    }
    let hub = Hub::start("library", 1400).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("registries.conf");
    std::fs::write(&conf, "short-name-mode = \"disabled\"\n").unwrap();
    let mirror = format!("http://{}", gantry.host());
    let args = [
        "podman",
        "--mirror",
        &mirror,
        "--insecure",
        "--path",
        s(&conf),
    ];
    configured(&args);
    assert_second_run_changes_nothing(&args, std::slice::from_ref(&conf));
    let podman = Podman::new(&conf);
    let reference = "docker.io/library/single:v1";
    let out = podman.pull(reference, &trap, &[&hub]).await;
    let image = podman.inspect(reference, &trap).await;
    assert_eq!(
        image["Digest"],
        hub.single.manifest_digest.as_str(),
        "{}",
        out.text()
    );
    hub.assert_fetched_once(&hub.single.blobs(), &[], &out.text());
    assert!(blob_lookups(&gantry).await >= hub.single.blobs().len() as f64);
    trap.assert_untouched(&out.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_through_gantry_with_the_daemon_json_configure_edited() {
    if !require_tools(DOCKER_TOOLS) {
        return;
    }
    let hub = Hub::start("library", 1500).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let mirror = format!("http://{}", gantry.host());
    let mut sandbox_keys = Vec::new();
    let dockerd = Dockerd::start_on_edited_config(&trap, |daemon_json| {
        let before: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(daemon_json).unwrap()).unwrap();
        sandbox_keys = before.as_object().unwrap().keys().cloned().collect();
        let args = [
            "docker",
            "--mirror",
            &mirror,
            "--insecure",
            "--path",
            s(daemon_json),
        ];
        configured(&args);
        assert_second_run_changes_nothing(&args, &[daemon_json.to_owned()]);
        let after: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(daemon_json).unwrap()).unwrap();
        for key in &sandbox_keys {
            assert_eq!(after[key], before[key], "{key} kept");
        }
    })
    .await;
    let out = dockerd.pull("single:v1", &trap, &[&hub]).await;
    let image = dockerd.inspect("single:v1").await;
    assert_eq!(
        image["Id"],
        hub.single.config_digest.as_str(),
        "{}",
        out.text()
    );
    hub.assert_fetched_once(&hub.single.blobs(), &[], &out.text());
    assert!(blob_lookups(&gantry).await >= hub.single.blobs().len() as f64);
    trap.assert_untouched(&dockerd.logs());
}
