//! `daemon.json`: the mirror in `registry-mirrors` (and its `host:port` in
//! `insecure-registries` with `--insecure`), every other key kept in its order (serde_json's
//! `preserve_order`). dockerd's `registry-mirrors` applies to Docker Hub only.

use serde_json::{Map, Value};

use super::{read_existing, Change, Error, Plan, Request};

pub(super) fn plan(request: &Request) -> Result<Plan, Error> {
    let path = &request.path;
    let before = read_existing(path)?;
    let mut warnings = Vec::new();
    let others: Vec<&str> = request
        .registries
        .iter()
        .map(String::as_str)
        .filter(|host| *host != "docker.io")
        .collect();
    if !others.is_empty() {
        warnings.push(format!(
            "dockerd mirrors only docker.io: registry-mirrors has no effect on {}. Use containerd or \
             podman for those, or pull through gantry by name (docker pull {}/{}/IMAGE)",
            others.join(", "),
            request.mirror.authority(),
            others[0]
        ));
    }
    if let Some(ca) = &request.ca {
        warnings.push(format!(
            "daemon.json has no CA setting: copy {} to /etc/docker/certs.d/{}/ca.crt",
            ca.display(),
            request.mirror.authority()
        ));
    }
    let original: Map<String, Value> = match before.as_deref() {
        None => Map::new(),
        // An empty file (made with `touch`) is read by dockerd as no settings.
        Some(text) if text.trim().is_empty() => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(Error::malformed(path, "not a JSON object")),
            Err(e) => return Err(Error::malformed(path, format!("not JSON: {e}"))),
        },
    };
    let mut settings = original.clone();
    let origin = request.mirror.origin();
    let same = |entry: &Value| {
        entry
            .as_str()
            .is_some_and(|e| e.trim_end_matches('/').eq_ignore_ascii_case(&origin))
    };
    let mirrors = list(&mut settings, "registry-mirrors", path)?;
    if !mirrors.iter().any(same) {
        // First: dockerd tries mirrors in order.
        mirrors.insert(0, Value::String(origin.clone()));
    }
    if request.insecure {
        let authority = request.mirror.authority().to_owned();
        let insecure = list(&mut settings, "insecure-registries", path)?;
        if !insecure.iter().any(|e| {
            e.as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(&authority))
        }) {
            insecure.push(Value::String(authority));
        }
    }
    let after = if before.is_some() && settings == original {
        // Nothing to add: keep the bytes as they are, whatever their formatting.
        before.clone().unwrap_or_default()
    } else {
        let mut out = Vec::new();
        let indent = indent_of(before.as_deref().unwrap_or(""));
        let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        serde::Serialize::serialize(&Value::Object(settings), &mut serializer)
            .map_err(|e| Error::malformed(path, e))?;
        let mut text = String::from_utf8_lossy(&out).into_owned();
        text.push('\n');
        text
    };
    Ok(Plan {
        changes: vec![Change {
            path: path.clone(),
            before,
            after,
        }],
        warnings,
    })
}

/// The array under `key`, created empty when absent.
fn list<'a>(
    settings: &'a mut Map<String, Value>,
    key: &str,
    path: &std::path::Path,
) -> Result<&'a mut Vec<Value>, Error> {
    match settings
        .entry(key)
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        Value::Array(list) => Ok(list),
        _ => Err(Error::malformed(path, format!("`{key}` is not an array"))),
    }
}

/// The indentation of the file's first indented line (two spaces for a new file), so a rewrite
/// changes only the lines that changed.
fn indent_of(text: &str) -> &str {
    text.lines()
        .find_map(|line| {
            let body = line.trim_start_matches([' ', '\t']);
            let indent = &line[..line.len() - body.len()];
            (!indent.is_empty() && !body.is_empty()).then_some(indent)
        })
        .unwrap_or("  ")
}
