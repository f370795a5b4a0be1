//! The deployment files (`deploy/`, `grafana/`) checked as far as this machine can: no Docker
//! engine, no cluster, no running systemd. Each file parses; gantry's own validation accepts every
//! gantry config they carry; the files agree with each other (ports, paths, service names); nginx
//! and systemd-analyze accept their files; and every metric the Grafana dashboard queries is one a
//! running gantry exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

use common::{free_port, pull, require_tools, skip_unless, which, Fixture, Gantry};
use gantry::config::{Config, LogFormat, Seconds};

// ---- helpers ----------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A repository file's text.
fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file (Kubernetes files hold several, separated by `---`).
fn documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, document)| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{relative}: document {}: {e}", i + 1))
        })
        .collect()
}

/// The one document of a file, with `<<:` merge keys applied (docker-compose.yml uses them).
fn document(relative: &str) -> Value {
    let mut documents = documents(relative);
    assert_eq!(documents.len(), 1, "{relative}: one YAML document");
    let mut value = documents.remove(0);
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{relative}: merge keys: {e}"));
    value
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn seq<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {value:?}"))
}

/// A gantry config validated by gantry itself. Every `_env:` key it uses must have a default, so
/// the file works without any environment (and this test needs to set none).
fn gantry_config(text: &str, origin: &str) -> Config {
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        if let Some(at) = code.find("_env:") {
            let spec = code[at + "_env:".len()..].trim();
            assert!(
                spec.contains(':'),
                "{origin}: `{}` has no default (write `_env:NAME:default`)",
                line.trim()
            );
        }
    }
    Config::from_yaml(text, Path::new(origin)).unwrap_or_else(|e| panic!("{e}"))
}

fn deploy_config(relative: &str) -> Config {
    gantry_config(&read(relative), relative)
}

/// The keys the contract gives `storage.s3` and `cluster` (#14); other tests rely on them.
const S3_KEYS: &[&str] = &[
    "endpoint",
    "bucket",
    "region",
    "prefix",
    "access_key_id",
    "secret_access_key",
    "allow_http",
    "max_size",
    "max_uploads",
];
const CLUSTER_KEYS: &[&str] = &["advertise_url", "secret", "lease_ttl"];

/// Whether this build's config knows `storage.s3` and `cluster:` (they land with the object tier
/// and the cluster, #14). Until then [`fleet_config`] checks those sections' keys against the
/// contract and validates the rest; from then on gantry validates the whole file.
fn config_knows_fleet_sections() -> bool {
    let probe = "storage:\n  path: /var/lib/gantry\n  s3:\n    bucket: gantry\n";
    Config::from_yaml(probe, Path::new("probe.yaml")).is_ok()
}

/// A fleet's gantry config (`storage.s3`, `cluster`) validated by gantry, given the environment
/// its workload sets (`name → value`; a value from a Secret is any non-empty placeholder).
/// Every `_env:` key without a default must be one the workload sets, so the file cannot start
/// with a variable missing. Returns the config and the raw YAML, whose `storage.s3` and
/// `cluster` values the callers compare with the rest of the deployment.
fn fleet_config(text: &str, origin: &str, env: &BTreeMap<String, String>) -> (Config, Value) {
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        if let Some(at) = code.find("_env:") {
            let spec = code[at + "_env:".len()..].trim();
            let name = spec.split(':').next().unwrap();
            assert!(
                spec.contains(':') || env.contains_key(name),
                "{origin}: `{}` has no default and the workload does not set {name}",
                line.trim()
            );
        }
    }
    let raw: Value = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{origin}: {e}"));
    for (section, allowed) in [
        (&raw["storage"]["s3"], S3_KEYS),
        (&raw["cluster"], CLUSTER_KEYS),
    ] {
        let keys = section
            .as_mapping()
            .unwrap_or_else(|| panic!("{origin}: storage.s3 and cluster are sections"));
        for key in keys.keys() {
            let key = str_of(key, "key");
            assert!(
                allowed.contains(&key),
                "{origin}: `{key}` is not in the contract"
            );
        }
    }
    for key in ["bucket", "access_key_id", "secret_access_key"] {
        assert!(
            raw["storage"]["s3"][key].is_string(),
            "{origin}: storage.s3.{key}"
        );
    }
    for key in ["advertise_url", "secret"] {
        assert!(raw["cluster"][key].is_string(), "{origin}: cluster.{key}");
    }
    let validated = if config_knows_fleet_sections() {
        for (name, value) in env {
            std::env::set_var(name, value);
        }
        text.to_owned()
    } else {
        let mut rest = raw.clone();
        rest["storage"].as_mapping_mut().unwrap().remove("s3");
        rest.as_mapping_mut().unwrap().remove("cluster");
        serde_yaml::to_string(&rest).unwrap()
    };
    let config = Config::from_yaml(&validated, Path::new(origin))
        .unwrap_or_else(|e| panic!("{origin}: {e}"));
    (config, raw)
}

/// The value an `_env:NAME[:default]` config entry takes in `env` (or its default).
fn resolve<'a>(raw: &'a Value, env: &'a BTreeMap<String, String>, what: &str) -> &'a str {
    let text = str_of(raw, what);
    let Some(spec) = text.strip_prefix("_env:") else {
        return text;
    };
    let (name, default) = spec
        .split_once(':')
        .map_or((spec, None), |(n, d)| (n, Some(d)));
    env.get(name)
        .map(String::as_str)
        .or(default)
        .unwrap_or_else(|| panic!("{what}: {name} is not set"))
}

/// The gantry config carried by the Kubernetes ConfigMap.
fn configmap_config() -> Config {
    let configmap = kubernetes_objects()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "gantry-config")
        .expect("kubernetes/configmap.yaml: ConfigMap gantry-config");
    gantry_config(
        str_of(&configmap["data"]["gantry.yaml"], "gantry-config data"),
        "deploy/kubernetes/configmap.yaml",
    )
}

fn port(config_addr: &gantry::config::ListenAddr) -> u16 {
    config_addr.0.port()
}

fn admin_port(config: &Config) -> u16 {
    port(config.admin_listen.as_ref().expect("admin_listen is on"))
}

/// (host, port) of a `redis://host:port/db` URL.
fn redis_host_port(config: &Config) -> (String, u16) {
    let url = config.cache.redis.as_ref().expect("cache.redis is set");
    let rest = url.expose().split("://").nth(1).expect("a URL");
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit('@').next().unwrap();
    let (host, port) = authority.split_once(':').unwrap_or((authority, "6379"));
    (host.to_owned(), port.parse().expect("a port number"))
}

// ---- every file parses ------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses() {
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy"), &mut files);
    yaml_files(&repo().join("grafana"), &mut files);
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(repo()).unwrap().display().to_string())
        .collect();
    for expected in [
        "deploy/docker-compose.yml",
        "deploy/prometheus.yml",
        "deploy/gantry.yaml",
        "deploy/gantry-redis.yaml",
        "deploy/gantry-fleet.yaml",
        "deploy/systemd/gantry.yaml",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/statefulset.yaml",
        "deploy/kubernetes/redis/redis.yaml",
        "deploy/kubernetes/fleet/kustomization.yaml",
        "deploy/kubernetes/fleet/deployment.yaml",
        "deploy/kubernetes/fleet/hpa.yaml",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/gantry.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} is missing");
    }
    for name in &names {
        let documents = documents(name);
        assert!(!documents.is_empty(), "{name}: no YAML document");
        for (i, document) in documents.iter().enumerate() {
            assert!(
                document.is_mapping(),
                "{name}: document {} is not a mapping: {document:?}",
                i + 1
            );
        }
    }
}

// ---- gantry configs ---------------------------------------------------------------------------

#[test]
fn gantry_configs_pass_gantry_validation() {
    // Containers: every interface, the image's volume, JSON logs.
    for (name, config) in [
        ("deploy/gantry.yaml", deploy_config("deploy/gantry.yaml")),
        (
            "deploy/gantry-redis.yaml",
            deploy_config("deploy/gantry-redis.yaml"),
        ),
        ("deploy/kubernetes/configmap.yaml", configmap_config()),
    ] {
        assert_eq!(config.listen.0.to_string(), "0.0.0.0:5000", "{name}");
        assert_eq!(
            config.admin_listen.as_ref().map(|a| a.0.to_string()),
            Some("0.0.0.0:9090".to_owned()),
            "{name}: admin reachable by Prometheus and probes"
        );
        assert_eq!(config.storage.path, Path::new("/var/lib/gantry"), "{name}");
        assert_eq!(config.log.format, LogFormat::Json, "{name}");
        assert!(config.storage.max_size.is_some(), "{name}: a bounded store");
    }
    assert!(
        deploy_config("deploy/gantry.yaml").cache.redis.is_none(),
        "the image's default config runs alone"
    );
    assert_eq!(
        redis_host_port(&deploy_config("deploy/gantry-redis.yaml")),
        ("redis".to_owned(), 6379),
        "compose's Redis service"
    );
    assert!(configmap_config().cache.redis.is_some());

    // A host under systemd: admin on loopback, the unit's StateDirectory.
    let host = deploy_config("deploy/systemd/gantry.yaml");
    assert!(host.admin_listen.as_ref().unwrap().0.ip().is_loopback());
    assert_eq!(host.storage.path, Path::new("/var/lib/gantry"));
    assert_eq!(host.log.format, LogFormat::Json, "journald gets no colours");
}

// ---- Dockerfile -------------------------------------------------------------------------------

/// (INSTRUCTION, arguments) with continuation lines joined and comments left out.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

#[test]
fn dockerfile_builds_from_files_in_the_repository() {
    let instructions = dockerfile_instructions(&read("deploy/Dockerfile"));
    let ignore = read("deploy/Dockerfile.dockerignore");
    let ignore: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let get = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
            .collect()
    };

    let stages: Vec<String> = get("FROM")
        .iter()
        .filter_map(|from| {
            let words: Vec<&str> = from.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("as"))?;
            words.get(at + 1).map(|s| s.to_string())
        })
        .collect();
    let froms = get("FROM");
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    assert!(froms[0].starts_with("rust:"), "built with rust: {froms:?}");

    // COPY sources from the build context (the repository root) exist and pass the ignore file.
    let mut context_sources = Vec::new();
    let mut config_destination = None;
    for copy in get("COPY").into_iter().chain(get("ADD")) {
        let words: Vec<&str> = copy.split_whitespace().collect();
        let (flags, paths): (Vec<&str>, Vec<&str>) =
            words.into_iter().partition(|w| w.starts_with("--"));
        let (destination, sources) = paths.split_last().expect("COPY SRC... DEST");
        if let Some(stage) = flags.iter().find_map(|f| f.strip_prefix("--from=")) {
            assert!(
                stages.iter().any(|s| s == stage),
                "COPY --from={stage}: no such stage"
            );
            continue;
        }
        for source in sources {
            let source = source.trim_end_matches('/').trim_start_matches("./");
            assert!(
                repo().join(source).exists(),
                "Dockerfile copies {source}, which is not in the repository"
            );
            if ignore.first() == Some(&"*") {
                assert!(
                    ignore.contains(&format!("!{source}").as_str()),
                    "Dockerfile.dockerignore leaves {source} out of the build context"
                );
            }
            if source.ends_with(".yaml") {
                config_destination = Some((source.to_owned(), destination.to_string()));
            }
            context_sources.push(source.to_owned());
        }
    }
    let (config_source, config_destination) = config_destination.expect("the image has a config");
    let config = deploy_config(&config_source);

    // The context holds the crate the binary is built from: in a copy of it, cargo finds the
    // same library, binary and build-script targets as in the repository (an uncopied build.rs
    // or src/bin file would be missing from the copy, not an error).
    let context = tempfile::tempdir().unwrap();
    for source in &context_sources {
        copy_tree(&repo().join(source), &context.path().join(source));
    }
    let build_targets = |manifest: &Path| -> BTreeSet<(String, String)> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .arg("--manifest-path")
            .arg(manifest)
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "cargo metadata --manifest-path {}: {}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        metadata["packages"][0]["targets"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| {
                let name = t["name"].as_str().unwrap().to_owned();
                t["kind"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |k| (k.as_str().unwrap().to_owned(), name.clone()))
            })
            .filter(|(kind, _)| matches!(kind.as_str(), "lib" | "bin" | "custom-build"))
            .collect()
    };
    let in_context = build_targets(&context.path().join("Cargo.toml"));
    assert!(
        in_context.contains(&("bin".to_owned(), "gantry".to_owned())),
        "the build context has the gantry binary: {in_context:?}"
    );
    assert_eq!(
        in_context,
        build_targets(&repo().join("Cargo.toml")),
        "the build context has every library, binary and build script of the crate"
    );

    // The runtime stage agrees with the config it carries.
    let volume = get("VOLUME");
    assert_eq!(
        volume,
        vec![config.storage.path.to_str().unwrap()],
        "VOLUME is storage.path"
    );
    let exposed: BTreeSet<u16> = get("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([port(&config.listen), admin_port(&config)])
    );
    let user = get("USER");
    let user = user.last().expect("a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as non-root: USER {user}"
    );
    let entrypoint: Vec<String> = serde_json::from_str(get("ENTRYPOINT")[0]).unwrap();
    assert_eq!(entrypoint, ["gantry"]);
    let cmd: Vec<String> = serde_json::from_str(get("CMD")[0]).unwrap();
    assert_eq!(cmd, ["serve", "--config", config_destination.as_str()]);
    assert!(
        get("COPY")
            .iter()
            .any(|c| c.contains("--from=") && c.ends_with("/usr/local/bin/gantry")),
        "the binary is on PATH as gantry"
    );
}

// ---- docker compose, nginx, Prometheus, Grafana provisioning -----------------------------------

/// (source, target) of a compose volume entry `source:target[:mode]`.
fn compose_volume(entry: &Value) -> (String, String) {
    let text = str_of(entry, "volume");
    let mut parts = text.split(':');
    let source = parts.next().unwrap().to_owned();
    let target = parts
        .next()
        .unwrap_or_else(|| panic!("volume `{text}` has a target"));
    (source, target.to_owned())
}

/// A compose service's environment as its containers see it: `${NAME:-default}` is the default,
/// `${NAME:?message}` (required) a placeholder, as if the operator set it.
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(name, value)| {
            let name = str_of(name, "variable").to_owned();
            let value = str_of(value, &name);
            let value = match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                Some(spec) => match spec.split_once(":-") {
                    Some((_, default)) => default.to_owned(),
                    None if spec.contains(":?") => format!("set-by-the-operator-{name}"),
                    None => panic!("{name}: `{value}` has no default"),
                },
                None => value.to_owned(),
            };
            (name, value)
        })
        .collect()
}

/// `section → key → string value` of a flat TOML file like garage.toml (top-level keys under
/// `""`); enough to compare its addresses and paths with the compose file's.
fn toml_sections(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not `key = value`: {line}"));
        sections.entry(section.clone()).or_default().insert(
            key.trim().to_owned(),
            value.trim().trim_matches('"').to_owned(),
        );
    }
    sections
}

fn nginx_upstream_servers(conf: &str) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("server "))
        .filter(|rest| !rest.starts_with('{'))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(';')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn compose_services_agree_with_each_other() {
    let compose = document("deploy/docker-compose.yml");
    let services = compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (str_of(k, "service name").to_owned(), v.clone()))
        .collect::<BTreeMap<String, Value>>();
    let named_volumes: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(|k| str_of(k, "volume").to_owned()).collect())
        .unwrap_or_default();
    let deploy = repo().join("deploy");

    // Every bind-mounted file or folder exists; every named volume is declared.
    for (name, service) in &services {
        for entry in service["volumes"].as_sequence().into_iter().flatten() {
            let (source, _) = compose_volume(entry);
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    deploy.join(&source).exists(),
                    "{name}: mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    named_volumes.contains(&source),
                    "{name}: volume {source} is not declared"
                );
            }
        }
    }

    let gantries: Vec<&String> = services
        .keys()
        .filter(|name| name.starts_with("gantry"))
        .collect();
    assert_eq!(gantries.len(), 3, "three replicas: {gantries:?}");
    let mut stores = BTreeSet::new();
    let mut config_port = None;
    let mut cluster_secrets = BTreeSet::new();
    let mut object_tiers = BTreeSet::new();
    for name in &gantries {
        let service = &services[name.as_str()];
        let build = &service["build"];
        let context = deploy.join(str_of(&build["context"], "build.context"));
        assert!(
            context
                .join(str_of(&build["dockerfile"], "build.dockerfile"))
                .is_file(),
            "{name}: the Dockerfile"
        );
        let env = compose_env(service);
        let mut config = None;
        let mut store = None;
        for entry in seq(&service["volumes"], "volumes") {
            let (source, target) = compose_volume(entry);
            if target == "/etc/gantry/gantry.yaml" {
                let file = format!("deploy/{}", source.trim_start_matches("./"));
                config = Some(fleet_config(&read(&file), &file, &env));
            } else {
                store = Some((source, target));
            }
        }
        let (config, raw) = config.unwrap_or_else(|| panic!("{name}: mounts a config"));

        // The fleet: each replica advertises its own service name and client port; all share one
        // cluster secret and one object tier, compose's Garage.
        let advertised = resolve(&raw["cluster"]["advertise_url"], &env, "advertise_url");
        assert_eq!(
            advertised,
            format!("http://{name}:{}", port(&config.listen)),
            "{name}: cluster.advertise_url is its own client port"
        );
        cluster_secrets
            .insert(str_of(&service["environment"]["GANTRY_CLUSTER_SECRET"], "secret").to_owned());
        let s3 = &raw["storage"]["s3"];
        object_tiers.insert(
            [
                "endpoint",
                "bucket",
                "region",
                "access_key_id",
                "secret_access_key",
            ]
            .map(|key| resolve(&s3[key], &env, key).to_owned()),
        );
        let (volume, target) = store.unwrap_or_else(|| panic!("{name}: a store volume"));
        assert_eq!(
            Path::new(&target),
            config.storage.path,
            "{name}: the store volume is storage.path"
        );
        assert!(stores.insert(volume), "{name}: a store of its own");
        assert!(
            config.cache.redis.is_some(),
            "{name}: replicas share tags through Redis"
        );
        let redis = str_of(
            &service["environment"]["GANTRY_REDIS_URL"],
            "GANTRY_REDIS_URL",
        );
        let host = redis
            .trim_start_matches("redis://")
            .split([':', '/'])
            .next()
            .unwrap();
        assert!(
            services.contains_key(host),
            "{name}: {redis}: no service {host}"
        );
        config_port = Some((port(&config.listen), admin_port(&config)));
    }
    let (api_port, admin) = config_port.unwrap();
    assert_eq!(
        cluster_secrets.len(),
        1,
        "one cluster secret: {cluster_secrets:?}"
    );
    assert!(
        cluster_secrets
            .iter()
            .all(|s| s.starts_with("${GANTRY_CLUSTER_SECRET:?") && s.matches('$').count() == 1),
        "compose refuses to start without a cluster secret (no default): {cluster_secrets:?}"
    );
    assert_eq!(object_tiers.len(), 1, "one object tier: {object_tiers:?}");
    let [endpoint, bucket, region, key_id, secret] = object_tiers.pop_first().unwrap();

    // Garage: the object tier's endpoint, region, key and bucket are the ones it is started with.
    let garage = &services["garage"];
    assert!(str_of(&garage["image"], "garage image").starts_with("dxflrs/garage:v2."));
    let command: Vec<&str> = seq(&garage["command"], "garage command")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        command.ends_with(&["server", "--single-node", "--default-bucket"]),
        "garage sets up its layout, key and bucket at start: {command:?}"
    );
    let garage_env = &garage["environment"];
    let garage_config = toml_sections(&read("deploy/garage.toml"));
    let s3_addr = &garage_config["s3_api"]["api_bind_addr"];
    let s3_port = s3_addr.rsplit(':').next().unwrap();
    assert_eq!(
        endpoint,
        format!("http://garage:{s3_port}"),
        "storage.s3.endpoint"
    );
    assert_eq!(
        region, garage_config["s3_api"]["s3_region"],
        "storage.s3.region"
    );
    assert_eq!(
        bucket,
        str_of(&garage_env["GARAGE_DEFAULT_BUCKET"], "bucket")
    );
    let env_of = |service: &str, name: &str| {
        compose_env(&services[service])
            .remove(name)
            .unwrap_or_default()
    };
    assert_eq!(key_id, env_of("garage", "GARAGE_DEFAULT_ACCESS_KEY"));
    assert_eq!(secret, env_of("garage", "GARAGE_DEFAULT_SECRET_KEY"));
    let rpc_secret = env_of("garage", "GARAGE_RPC_SECRET");
    assert!(
        rpc_secret.len() == 64 && rpc_secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "garage needs an RPC secret of 32 bytes in hex: {rpc_secret:?}"
    );
    let mounts: BTreeMap<String, String> = seq(&garage["volumes"], "garage volumes")
        .iter()
        .map(compose_volume)
        .map(|(source, target)| (target, source))
        .collect();
    assert_eq!(
        mounts.get("/etc/garage.toml").map(String::as_str),
        Some("./garage.toml")
    );
    for dir in ["metadata_dir", "data_dir"] {
        let path = &garage_config[""][dir];
        assert!(
            mounts.get(path).is_some_and(|v| named_volumes.contains(v)),
            "garage's {dir} {path} is on a named volume"
        );
    }

    // nginx hashes to exactly the replicas, on their API port.
    let nginx = &services["nginx"];
    assert!(seq(&nginx["volumes"], "nginx volumes")
        .iter()
        .any(|v| compose_volume(v) == ("./nginx.conf".into(), "/etc/nginx/nginx.conf".into())));
    let conf = read("deploy/nginx.conf");
    let servers: BTreeSet<String> = nginx_upstream_servers(&conf).into_iter().collect();
    let expected: BTreeSet<String> = gantries.iter().map(|g| format!("{g}:{api_port}")).collect();
    assert_eq!(servers, expected, "nginx.conf upstream servers");
    assert!(conf.contains("consistent;"), "consistent hashing");

    // Prometheus scrapes exactly the replicas' admin ports.
    let prometheus = document("deploy/prometheus.yml");
    let targets: BTreeSet<String> = seq(&prometheus["scrape_configs"], "scrape_configs")
        .iter()
        .flat_map(|job| seq(&job["static_configs"], "static_configs").iter())
        .flat_map(|sc| seq(&sc["targets"], "targets").iter())
        .map(|t| str_of(t, "target").to_owned())
        .collect();
    let expected: BTreeSet<String> = gantries.iter().map(|g| format!("{g}:{admin}")).collect();
    assert_eq!(targets, expected, "prometheus.yml targets");

    // Grafana: provisioning mounted where Grafana reads it; the provider's folder holds the
    // dashboard; the data source is compose's Prometheus.
    let grafana = &services["grafana"];
    let mounts: BTreeMap<String, String> = seq(&grafana["volumes"], "grafana volumes")
        .iter()
        .map(compose_volume)
        .map(|(source, target)| (target, source))
        .collect();
    assert_eq!(
        mounts.get("/etc/grafana/provisioning").map(String::as_str),
        Some("../grafana/provisioning")
    );
    let provider = document("grafana/provisioning/dashboards/gantry.yaml");
    let folder = str_of(
        &seq(&provider["providers"], "providers")[0]["options"]["path"],
        "provider path",
    );
    let (dashboard_target, dashboard_source) = mounts
        .iter()
        .find(|(_, source)| source.ends_with("gantry-dashboard.json"))
        .expect("grafana mounts the dashboard");
    assert_eq!(dashboard_source, "../grafana/gantry-dashboard.json");
    assert_eq!(
        Path::new(dashboard_target).parent().unwrap(),
        Path::new(folder),
        "the provider reads the folder the dashboard is mounted in"
    );
    let datasources = document("grafana/provisioning/datasources/prometheus.yaml");
    let datasource = &seq(&datasources["datasources"], "datasources")[0];
    assert_eq!(datasource["type"], "prometheus");
    let url = str_of(&datasource["url"], "datasource url");
    let host = url.trim_start_matches("http://").split(':').next().unwrap();
    assert!(
        services.contains_key(host),
        "datasource {url}: no service {host}"
    );
}

#[test]
fn nginx_accepts_the_config() {
    if !require_tools(&["nginx"]) {
        return;
    }
    let conf = read("deploy/nginx.conf");
    for directive in [
        "client_max_body_size 0;",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_set_header Host $http_host;",
        "proxy_read_timeout",
    ] {
        assert!(conf.contains(directive), "nginx.conf: {directive}");
    }
    assert!(
        conf.lines().any(|l| {
            let l = l.trim();
            l.starts_with("hash ") && l.ends_with(" consistent;")
        }),
        "nginx.conf: consistent hashing"
    );

    // The compose host names do not resolve here: upstream servers become 127.0.0.1 ports, and
    // the pid file and error log move into a temp prefix.
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path();
    let mut servers = 0;
    let local: String = conf
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            if let Some(rest) = trimmed
                .strip_prefix("server ")
                .filter(|rest| !rest.starts_with('{'))
            {
                servers += 1;
                let (_, options) = rest.split_once(char::is_whitespace).unwrap_or(("", ";"));
                let options = if options.trim().is_empty() {
                    ";"
                } else {
                    options
                };
                format!(
                    "{indent}server 127.0.0.1:{} {}",
                    free_port(),
                    options.trim()
                )
            } else if trimmed.starts_with("pid ") {
                format!("pid {};", prefix.join("nginx.pid").display())
            } else if trimmed.starts_with("error_log ") && indent.is_empty() {
                format!("error_log {} warn;", prefix.join("error.log").display())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(servers, 3, "three upstream servers");
    let nginx_test = |text: &str| {
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, text).unwrap();
        let output = Command::new(which("nginx").unwrap())
            .arg("-t")
            .arg("-p")
            .arg(format!("{}/", prefix.display()))
            .arg("-e")
            .arg(prefix.join("error.log"))
            .arg("-c")
            .arg(&path)
            .output()
            .expect("nginx runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let (ok, output) = nginx_test(&local);
    assert!(ok, "nginx -t rejects deploy/nginx.conf:\n{output}\n{local}");
    // The check can fail: a broken copy is rejected.
    let broken = local.replacen("proxy_buffering off;", "proxy_buffering of;", 1);
    let (ok, output) = nginx_test(&broken);
    assert!(!ok, "nginx -t accepted a broken config:\n{output}");
}

// ---- Kubernetes -------------------------------------------------------------------------------

/// The StatefulSet variant's objects.
fn kubernetes_objects() -> Vec<Value> {
    kustomize_objects("deploy/kubernetes")
}

/// Every object a kustomization lists: its files' documents, and those of the kustomizations in
/// the directories it lists (`../redis`).
fn kustomize_objects(dir: &str) -> Vec<Value> {
    let kustomization = document(&format!("{dir}/kustomization.yaml"));
    seq(&kustomization["resources"], "kustomization resources")
        .iter()
        .flat_map(|resource| {
            let path = format!("{dir}/{}", str_of(resource, "kustomization resource"));
            if repo().join(&path).is_dir() {
                kustomize_objects(&path)
            } else {
                assert!(repo().join(&path).is_file(), "{path} is missing");
                documents(&path)
            }
        })
        .collect()
}

/// Every workload: non-root, read-only root, no privilege escalation, requests and limits.
fn assert_workloads_hardened(objects: &[Value]) {
    for workload in objects
        .iter()
        .filter(|o| o["kind"] == "StatefulSet" || o["kind"] == "Deployment")
    {
        let name = str_of(&workload["metadata"]["name"], "name");
        let pod = &workload["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        for container in seq(&pod["containers"], "containers") {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["capabilities"]["drop"][0], "ALL", "{name}");
            for kind in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        !container["resources"][kind][resource].is_null(),
                        "{name}: resources.{kind}.{resource}"
                    );
                }
            }
        }
    }
}

/// Every Service selects some workload's pods.
fn assert_services_select_pods(objects: &[Value]) {
    let workload_labels: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "StatefulSet" || o["kind"] == "Deployment")
        .map(|o| &o["spec"]["template"]["metadata"]["labels"])
        .collect();
    for service in objects.iter().filter(|o| o["kind"] == "Service") {
        assert!(
            workload_labels
                .iter()
                .any(|labels| labels_match(&service["spec"]["selector"], labels)),
            "Service {:?} selects no pods",
            service["metadata"]["name"]
        );
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn kubernetes_manifests_agree_with_each_other() {
    let objects = kubernetes_objects();
    for object in &objects {
        for key in ["apiVersion", "kind"] {
            assert!(object[key].is_string(), "{key} in {object:?}");
        }
        assert!(object["metadata"]["name"].is_string(), "a name: {object:?}");
    }
    let find = |kind: &str, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
    };
    let config = configmap_config();
    let statefulset = find("StatefulSet", "gantry");
    let spec = &statefulset["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(labels_match(&spec["selector"]["matchLabels"], pod_labels));

    // The governing Service is headless; every Service selects some workload's pods.
    let headless = find("Service", str_of(&spec["serviceName"], "serviceName"));
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_services_select_pods(&objects);

    // gantry's container: its config from the ConfigMap, its store on the volume claim, its
    // ports those of the config, probes on the admin port.
    let containers = seq(&pod["containers"], "containers");
    let container = &containers[0];
    let (config_path, mounts) = config_path_and_mounts(container);
    let config_volume = seq(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == "gantry-config")
        .expect("a volume from the ConfigMap");
    assert_eq!(
        mounts
            .get(str_of(&config_volume["name"], "volume name"))
            .map(Path::new),
        config_path.parent(),
        "the ConfigMap is mounted where --config points"
    );
    assert_eq!(
        config_path.file_name().unwrap(),
        "gantry.yaml",
        "the ConfigMap key"
    );
    let claims = seq(&spec["volumeClaimTemplates"], "volumeClaimTemplates");
    let claim = str_of(&claims[0]["metadata"]["name"], "claim name");
    assert_eq!(
        mounts.get(claim).map(Path::new),
        Some(config.storage.path.as_path()),
        "the volume claim is mounted at storage.path"
    );
    assert_ports_probes_and_grace(container, pod, &config);

    assert_workloads_hardened(&objects);

    // The config's Redis is the Redis Service.
    let (host, redis_port) = redis_host_port(&config);
    let redis = find("Service", &host);
    assert!(seq(&redis["spec"]["ports"], "ports")
        .iter()
        .any(|p| p["port"].as_u64() == Some(u64::from(redis_port))));
}

/// Bytes of a Kubernetes quantity such as `20Gi` or `500M`.
fn quantity_bytes(text: &str) -> u64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("quantity {text}"));
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => panic!("quantity {text}: unit {unit}"),
    };
    number * scale
}

/// The pod IP the fleet test stands in for the downward API's `status.podIP`.
const POD_IP: &str = "10.1.2.3";

/// A container's environment as Kubernetes builds it: in order, `$(NAME)` in a value replaced
/// by an earlier variable (Kubernetes leaves a later or unknown one as written, which is a bug
/// here), the downward API's pod IP as [`POD_IP`], a Secret's value as a placeholder. Returns
/// the variables and the (Secret, key) pairs read.
fn container_env(container: &Value) -> (BTreeMap<String, String>, BTreeSet<(String, String)>) {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut secrets = BTreeSet::new();
    for entry in seq(&container["env"], "env") {
        let name = str_of(&entry["name"], "env name").to_owned();
        let value = if let Some(value) = entry["value"].as_str() {
            let mut value = value.to_owned();
            while let Some(at) = value.find("$(") {
                let end = value[at..].find(')').expect("$(NAME)") + at;
                let reference = value[at + 2..end].to_owned();
                let resolved = env
                    .get(&reference)
                    .unwrap_or_else(|| panic!("{name}: $({reference}) is not defined before it"));
                value.replace_range(at..=end, resolved);
            }
            value
        } else if let Some(path) = entry["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert_eq!(path, "status.podIP", "{name}");
            POD_IP.to_owned()
        } else {
            let secret = &entry["valueFrom"]["secretKeyRef"];
            let key = str_of(&secret["key"], "secretKeyRef.key").to_owned();
            secrets.insert((
                str_of(&secret["name"], "secretKeyRef.name").to_owned(),
                key.clone(),
            ));
            // One shape that every Secret-sourced key admits: a URL without a path (an endpoint),
            // and a token of no spaces, long enough for a cluster secret.
            format!("https://{key}-0123456789abcdef.from-the-secret.example")
        };
        env.insert(name, value);
    }
    (env, secrets)
}

#[test]
fn kubernetes_fleet_agrees_with_itself() {
    let objects = kustomize_objects("deploy/kubernetes/fleet");
    let find = |kind: &str, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("fleet: {kind} {name}"))
    };
    assert_workloads_hardened(&objects);
    assert_services_select_pods(&objects);
    let deployment = find("Deployment", "gantry-fleet");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(labels_match(&spec["selector"]["matchLabels"], pod_labels));
    let container = &seq(&pod["containers"], "containers")[0];
    let (env, secrets) = container_env(container);

    // The config: the ConfigMap mounted where --config points, every variable it needs set.
    let (config_path, mounts) = config_path_and_mounts(container);
    let volumes = seq(&pod["volumes"], "volumes");
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"].is_mapping())
        .expect("a volume from a ConfigMap");
    assert_eq!(
        mounts
            .get(str_of(&config_volume["name"], "volume name"))
            .map(Path::new),
        config_path.parent(),
        "the ConfigMap is mounted where --config points"
    );
    let configmap = find(
        "ConfigMap",
        str_of(&config_volume["configMap"]["name"], "configMap name"),
    );
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let (config, raw) = fleet_config(
        str_of(&configmap["data"][file], "the ConfigMap's gantry.yaml"),
        "deploy/kubernetes/fleet/configmap.yaml",
        &env,
    );

    // The local tier on an emptyDir at storage.path, bounded above storage.max_size.
    let store = volumes
        .iter()
        .find(|v| v["emptyDir"].is_mapping())
        .expect("an emptyDir for the local tier");
    assert_eq!(
        mounts
            .get(str_of(&store["name"], "volume name"))
            .map(Path::new),
        Some(config.storage.path.as_path()),
        "the emptyDir is mounted at storage.path"
    );
    let limit = quantity_bytes(str_of(&store["emptyDir"]["sizeLimit"], "sizeLimit"));
    let max_size = config.storage.max_size.expect("a bounded local tier").0;
    assert!(
        max_size < limit,
        "storage.max_size ({max_size}) leaves room below the emptyDir's sizeLimit ({limit}) for tmp/"
    );
    assert!(
        volumes.iter().all(|v| v["persistentVolumeClaim"].is_null()),
        "the fleet keeps no volume claims"
    );

    // The cluster: each pod advertises its own IP and client port; the secrets come from one
    // Secret, whose keys are the ones docs/fleet.md and the kustomization tell users to create.
    assert_eq!(
        resolve(
            &raw["cluster"]["advertise_url"],
            &env,
            "cluster.advertise_url"
        ),
        format!("http://{POD_IP}:{}", port(&config.listen)),
        "cluster.advertise_url: the pod's IP (downward API) and the client port"
    );
    let secret_names: BTreeSet<&str> = secrets.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(secret_names, BTreeSet::from(["gantry-fleet"]), "one Secret");
    let secret_keys: BTreeSet<String> = secrets.into_iter().map(|(_, key)| key).collect();
    for (doc, text) in [
        ("docs/fleet.md", read("docs/fleet.md")),
        (
            "deploy/kubernetes/fleet/kustomization.yaml",
            read("deploy/kubernetes/fleet/kustomization.yaml"),
        ),
    ] {
        assert!(text.contains("create secret generic gantry-fleet"), "{doc}");
        let created: BTreeSet<String> = text
            .split("--from-literal=")
            .skip(1)
            .map(|rest| rest.split('=').next().unwrap().to_owned())
            .collect();
        assert_eq!(created, secret_keys, "{doc}: the Secret's keys");
    }
    for key in ["access_key_id", "secret_access_key"] {
        assert!(
            str_of(&raw["storage"]["s3"][key], key).starts_with("_env:"),
            "storage.s3.{key} comes from the environment (the Secret), not the ConfigMap"
        );
    }
    assert!(
        str_of(&raw["cluster"]["secret"], "cluster.secret").starts_with("_env:"),
        "cluster.secret comes from the Secret"
    );

    // Ports, probes, grace: as the StatefulSet's.
    assert_ports_probes_and_grace(container, pod, &config);

    // Clients reach the pods through a plain Service on the client port.
    let service = find("Service", "gantry-fleet");
    assert!(labels_match(&service["spec"]["selector"], pod_labels));
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");

    // The PodDisruptionBudget and the autoscaler cover this Deployment; the autoscaler owns the
    // count and keeps enough replicas for the budget to let one go.
    let pdb = find("PodDisruptionBudget", "gantry-fleet");
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let unavailable = pdb["spec"]["maxUnavailable"]
        .as_u64()
        .expect("maxUnavailable");
    let hpa = find("HorizontalPodAutoscaler", "gantry-fleet");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(
        (&target["apiVersion"], &target["kind"], &target["name"]),
        (
            &deployment["apiVersion"],
            &deployment["kind"],
            &deployment["metadata"]["name"]
        ),
        "the autoscaler scales the Deployment"
    );
    let min = hpa["spec"]["minReplicas"].as_u64().expect("minReplicas");
    let max = hpa["spec"]["maxReplicas"].as_u64().expect("maxReplicas");
    assert!(
        min > unavailable && max >= min,
        "replicas {min}..{max}, {unavailable} may go"
    );
    assert!(
        spec["replicas"].is_null(),
        "no replicas: in the Deployment: the autoscaler owns the count"
    );

    // The config's Redis is the shared Redis Service.
    let (host, redis_port) = redis_host_port(&config);
    let redis = find("Service", &host);
    assert!(seq(&redis["spec"]["ports"], "ports")
        .iter()
        .any(|p| p["port"].as_u64() == Some(u64::from(redis_port))));

    // Both variants side by side in one namespace: no object name in common but the Redis.
    let base: BTreeSet<(String, String)> = kubernetes_objects()
        .iter()
        .map(|o| {
            (
                str_of(&o["kind"], "kind").to_owned(),
                str_of(&o["metadata"]["name"], "name").to_owned(),
            )
        })
        .collect();
    for object in &objects {
        let id = (
            str_of(&object["kind"], "kind").to_owned(),
            str_of(&object["metadata"]["name"], "name").to_owned(),
        );
        assert!(
            !base.contains(&id) || id.1 == "gantry-redis",
            "{id:?} is in both variants"
        );
    }
    // ... and neither variant's Services or budget select the other's pods.
    for object in kubernetes_objects() {
        let selector = match object["kind"].as_str() {
            Some("Service") => &object["spec"]["selector"],
            Some("PodDisruptionBudget") => &object["spec"]["selector"]["matchLabels"],
            _ => continue,
        };
        assert!(
            !labels_match(selector, pod_labels),
            "{:?} of the StatefulSet variant selects the fleet's pods",
            object["metadata"]["name"]
        );
    }
}

// ---- systemd ----------------------------------------------------------------------------------

/// `Key=value` lines of a unit, by section (later values of a key come last).
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        out.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    out
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let text = read("deploy/systemd/gantry.service");
    let entries = unit_entries(&text);
    let value = |key: &str| -> String {
        entries
            .iter()
            .rev()
            .find(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_else(|| panic!("gantry.service: [Service] {key}="))
    };
    assert_eq!(
        value("ExecStart"),
        "/usr/local/bin/gantry serve --config /etc/gantry/gantry.yaml"
    );
    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("StateDirectory", "gantry"),
    ] {
        assert_eq!(value(key), expected, "{key}");
    }
    let config = deploy_config("deploy/systemd/gantry.yaml");
    assert_eq!(
        config.storage.path,
        Path::new("/var/lib").join(value("StateDirectory")),
        "storage.path is the StateDirectory"
    );
    let stop = Seconds::parse(&value("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(
        stop.0 > config.timeouts.shutdown.0,
        "TimeoutStopSec ({:?}) outlasts timeouts.shutdown ({:?})",
        stop.0,
        config.timeouts.shutdown.0
    );

    let analyze = which("systemd-analyze");
    if !skip_unless(
        analyze.is_some(),
        "systemd-analyze verify: systemd-analyze is not installed (scripts/test installs systemd)",
    ) {
        return;
    }
    let analyze = analyze.unwrap();
    // ExecStart must name an executable that exists: the gantry this test was built with.
    let dir = tempfile::tempdir().unwrap();
    let verify = |unit: &str| -> Vec<String> {
        let path = dir.path().join("gantry.service");
        std::fs::write(&path, unit).unwrap();
        let output = Command::new(&analyze)
            .arg("verify")
            .arg(&path)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("systemd-analyze runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // Warnings (unknown keys, unparsable values) leave the exit code 0: any line about the
        // unit counts. Lines about other units of this machine do not.
        let mut problems: Vec<String> = text
            .lines()
            .filter(|l| l.contains("gantry.service"))
            .map(str::to_owned)
            .collect();
        if !output.status.success() && problems.is_empty() {
            problems.push(text);
        }
        problems
    };
    let local = text.replace("/usr/local/bin/gantry", env!("CARGO_BIN_EXE_gantry"));
    let problems = verify(&local);
    assert!(
        problems.is_empty(),
        "systemd-analyze verify:\n{}",
        problems.join("\n")
    );
    // The check can fail: an unknown key is reported.
    let broken = local.replace("PrivateTmp=yes", "PrivateTmp=yes\nPrivateTpm=yes");
    assert!(
        !verify(&broken).is_empty(),
        "systemd-analyze verify did not report an unknown key"
    );
}

// ---- Grafana dashboard ------------------------------------------------------------------------

/// A metric family defined in src/metrics.rs.
#[derive(Debug)]
struct Family {
    name: String,
    /// The constructor in `Metrics::new`: `counter_vec`, `histogram_vec`, `gauge`, `counter`.
    constructor: String,
    labels: Vec<String>,
}

impl Family {
    fn is_vector(&self) -> bool {
        self.constructor.ends_with("_vec")
    }
    fn is_histogram(&self) -> bool {
        self.constructor.starts_with("histogram")
    }
}

/// The families of src/metrics.rs, read as text: each `"gantry_..."` name that is the first
/// argument of a constructor call, with the label list of vector constructors.
fn defined_families() -> Vec<Family> {
    let text = read("src/metrics.rs");
    // The definitions, not the unit tests below them.
    let text = text.split("#[cfg(test)]").next().unwrap();
    let mut families = Vec::new();
    for (at, _) in text.match_indices("\"gantry_") {
        let Some(before) = text[..at].trim_end().strip_suffix('(') else {
            continue;
        };
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let constructor = before[start..].to_owned();
        let name_end = text[at + 1..].find('"').unwrap() + at + 1;
        let name = text[at + 1..name_end].to_owned();
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        let labels = if constructor.ends_with("_vec") {
            let open = text[name_end..].find("&[").unwrap() + name_end + 2;
            let close = text[open..].find(']').unwrap() + open;
            text[open..close]
                .split(',')
                .map(|l| l.trim().trim_matches('"').to_owned())
                .filter(|l| !l.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        families.push(Family {
            name,
            constructor,
            labels,
        });
    }
    assert!(
        families.len() >= 10,
        "src/metrics.rs: families found: {families:?}"
    );
    families
}

/// Every PromQL expression of the dashboard: panel targets and templating queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            queries.push(variable["query"]["query"].as_str().unwrap().to_owned());
        }
    }
    queries
}

/// The `gantry_*` names an expression uses, as written (`_bucket` included).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in expr.match_indices("gantry_") {
        let boundary = expr[..at]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if boundary {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

/// The labels named in `by (...)` and `without (...)` clauses.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by (", "without ("] {
        for (at, _) in expr.match_indices(keyword) {
            let open = at + keyword.len();
            let close = expr[open..].find(')').unwrap() + open;
            labels.extend(expr[open..close].split(',').map(|l| l.trim().to_owned()));
        }
    }
    labels
}

/// The family a dashboard name refers to (`x_bucket` → the histogram `x`).
fn family_of<'a>(families: &'a [Family], name: &str) -> Option<&'a Family> {
    families.iter().find(|f| f.name == name).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            families.iter().find(|f| f.name == base && f.is_histogram())
        })
    })
}

fn load_dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/gantry-dashboard.json"))
        .unwrap_or_else(|e| panic!("grafana/gantry-dashboard.json: {e}"))
}

#[test]
fn dashboard_is_well_formed_and_covers_every_metric() {
    let dashboard = load_dashboard();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a DS_PROMETHEUS data source variable"
    );
    let datasource = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: id");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], datasource, "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"], datasource, "{title}");
        }
    }

    // Every name is a gantry family; every grouping label is one of its labels; every family
    // gantry exports has a panel.
    let families = defined_families();
    let mut used = BTreeSet::new();
    for expr in dashboard_queries(&dashboard) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "a query on no gantry metric: {expr}");
        let mut labels: BTreeSet<String> = ["instance", "job"].map(String::from).into();
        for name in names {
            let family = family_of(&families, &name).unwrap_or_else(|| {
                panic!("{name} is not a metric src/metrics.rs defines (in `{expr}`)")
            });
            labels.extend(family.labels.iter().cloned());
            if family.is_histogram() {
                labels.insert("le".into());
            }
            used.insert(family.name.clone());
        }
        for label in grouping_labels(&expr) {
            assert!(
                labels.contains(&label),
                "`{label}` is no label of the metrics of `{expr}`"
            );
        }
    }
    let unused: Vec<&str> = families
        .iter()
        .map(|f| f.name.as_str())
        .filter(|name| !used.contains(*name))
        .collect();
    assert!(unused.is_empty(), "metrics on no panel: {unused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_are_exported_by_a_running_gantry() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let reference = format!("{}/test/multi:v1", gantry.host());
    for pull_kind in ["cold", "warm"] {
        let (_out, result) = pull(&reference, false).await;
        result.unwrap_or_else(|e| panic!("{pull_kind} pull: {e}"));
    }
    let scrape = gantry.metrics().await;
    let exported: BTreeMap<String, String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect();
    // After a cold and a warm pull, the cache answered blobs.
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("gantry_cache_lookups_total{kind=\"blob\",outcome=\"hit\"}")),
        "{scrape}"
    );

    let families = defined_families();
    let dashboard = load_dashboard();
    let mut from_source = BTreeSet::new();
    for expr in dashboard_queries(&dashboard) {
        for name in metric_names(&expr) {
            let family = family_of(&families, &name)
                .unwrap_or_else(|| panic!("{name} is not defined in src/metrics.rs"));
            if exported.contains_key(&family.name) {
                if family.is_histogram() {
                    assert_eq!(exported[&family.name], "histogram", "{name}");
                }
                continue;
            }
            // The prometheus crate leaves out a label vector with no sample yet: not even its
            // `# HELP` line is written. Vectors a normal pull does not touch (download failures,
            // tag revalidations inside the TTL, ...) are checked against src/metrics.rs, read as
            // text, instead; every metric without labels must be in the scrape.
            assert!(
                family.is_vector(),
                "{} (a {}) is not in /metrics after a pull:\n{scrape}",
                family.name,
                family.constructor
            );
            from_source.insert(family.name.clone());
        }
    }
    eprintln!(
        "label vectors without samples after a pull, found in src/metrics.rs: {from_source:?}"
    );
    // The families with samples after a pull include the request, cache, upstream and store ones.
    for name in [
        "gantry_http_requests_total",
        "gantry_http_request_duration_seconds",
        "gantry_cache_lookups_total",
        "gantry_upstream_requests_total",
        "gantry_upstream_request_duration_seconds",
        "gantry_upstream_bytes_total",
        "gantry_store_bytes",
        "gantry_store_entries",
    ] {
        assert!(
            exported.contains_key(name),
            "{name} after a pull:\n{scrape}"
        );
    }
    gantry.stop().await;
}

/// PromQL syntax and the Prometheus config, checked by promtool (Debian's `prometheus` package
/// ships it; scripts/test installs it). `PROMTOOL` may name the binary.
#[test]
fn dashboard_queries_and_prometheus_config_pass_promtool() {
    let promtool = std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .or_else(|| which("promtool"));
    if !skip_unless(
        promtool.is_some(),
        "promtool is not installed (scripts/test installs prometheus)",
    ) {
        return;
    }
    let promtool = promtool.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Grafana's variables, replaced by values a recording rule accepts.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_queries(&load_dashboard()).iter().enumerate() {
        if expr.starts_with("label_values(") {
            continue;
        }
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let rules_path = dir.path().join("rules.yml");
    std::fs::write(&rules_path, &rules).unwrap();
    for args in [
        vec![
            "check".to_owned(),
            "rules".to_owned(),
            rules_path.display().to_string(),
        ],
        vec![
            "check".to_owned(),
            "config".to_owned(),
            repo().join("deploy/prometheus.yml").display().to_string(),
        ],
    ] {
        let output = Command::new(&promtool)
            .args(&args)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A gantry container's ports match its config, its probes use the admin port, and its pod's
/// grace period outlasts `timeouts.shutdown`: the same for the StatefulSet and the fleet.
fn assert_ports_probes_and_grace(container: &Value, pod: &Value, config: &Config) {
    let ports: BTreeMap<&str, u64> = seq(&container["ports"], "ports")
        .iter()
        .map(|p| {
            (
                str_of(&p["name"], "port name"),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("http"), Some(&u64::from(port(&config.listen))));
    assert_eq!(ports.get("admin"), Some(&u64::from(admin_port(config))));
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.timeouts.shutdown.0.as_secs(),
        "terminationGracePeriodSeconds ({grace}) outlasts timeouts.shutdown"
    );
}

/// A gantry container's `--config` path and its volume mounts (name → path).
fn config_path_and_mounts(container: &Value) -> (&Path, BTreeMap<&str, &str>) {
    let args: Vec<&str> = seq(&container["args"], "args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let mounts = seq(&container["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| {
            (
                str_of(&m["name"], "mount"),
                str_of(&m["mountPath"], "mountPath"),
            )
        })
        .collect();
    (Path::new(args[at + 1]), mounts)
}

// ---- the node set-up DaemonSet ----------------------------------------------------------------

/// deploy/kubernetes/configure-daemonset.yaml: its init container's arguments run for real (the
/// built binary, `--path` moved to a temp dir) and write a hosts.toml per `--registry` pointing at
/// the mirror; the path it writes is the node directory mounted there; the mirror is the
/// `gantry` Service's port; every container is hardened.
#[test]
fn configure_daemonset_writes_hosts_toml_for_each_registry() {
    let daemonset = document("deploy/kubernetes/configure-daemonset.yaml");
    assert_eq!(daemonset["kind"], "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let init = &seq(&pod["initContainers"], "initContainers")[0];
    let args: Vec<&str> = seq(&init["args"], "args")
        .iter()
        .map(|a| str_of(a, "an argument"))
        .collect();
    assert_eq!(args[..2], ["configure", "containerd"], "{args:?}");
    let flag = |name: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1])
            .collect()
    };
    let path = flag("--path");
    assert_eq!(path, ["/etc/containerd/certs.d"], "{args:?}");
    let mount = seq(&init["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path[0])
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path[0]));
    let volume = seq(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(
        volume["hostPath"]["path"], path[0],
        "the node's own directory"
    );
    let mirror = flag("--mirror");
    let service_port = kubernetes_objects()
        .into_iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "gantry")
        .expect("Service gantry")["spec"]["ports"][0]["port"]
        .as_u64()
        .unwrap();
    assert_eq!(
        mirror,
        [format!("http://gantry.gantry.svc:{service_port}").as_str()]
    );
    for container in seq(&pod["containers"], "containers")
        .iter()
        .chain(seq(&pod["initContainers"], "initContainers"))
    {
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{container:?}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{container:?}");
        assert_eq!(security["capabilities"]["drop"][0], "ALL", "{container:?}");
        assert!(security["privileged"] != true, "{container:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let mut run: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let at = run.iter().position(|a| a == "--path").unwrap() + 1;
    run[at] = certs.display().to_string();
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(&run)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gantry {run:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for registry in flag("--registry") {
        let file = certs.join(registry).join("hosts.toml");
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("[host.\"{}\"]", mirror[0])),
            "{}:\n{text}",
            file.display()
        );
    }
}
