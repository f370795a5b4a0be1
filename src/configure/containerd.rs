//! `<certs.d>/<registry>/hosts.toml` per registry: the registry's real endpoint as `server` and
//! gantry as a `[host]` with `pull` and `resolve`, the layout docs/clients.md documents.
//! containerd adds `?ns=<registry>` to every request it sends to a `[host]`, which is how gantry
//! tells the registries apart, so the host URL is gantry's own origin (no path, no
//! `override_path`). The file belongs to this registry's mirror set-up as a whole, so it is
//! replaced rather than merged; one that does not parse as TOML is refused (it may hold an
//! operator's hand-written set-up that a typo broke).

use std::path::Path;

use super::{read_existing, Change, Error, Plan, Request};

pub(super) fn plan(request: &Request) -> Result<Plan, Error> {
    let mut changes = Vec::new();
    for registry in &request.registries {
        let path = request.path.join(registry).join("hosts.toml");
        let before = read_existing(&path)?;
        if let Some(text) = &before {
            text.parse::<toml_edit::DocumentMut>()
                .map_err(|e| Error::malformed(&path, format!("not TOML: {e}")))?;
        }
        changes.push(Change {
            after: hosts_toml(request, registry),
            path,
            before,
        });
    }
    Ok(Plan {
        changes,
        warnings: Vec::new(),
    })
}

/// The registry's own endpoint: Docker Hub's API is served from registry-1.docker.io.
fn server(registry: &str) -> String {
    match registry {
        "docker.io" => "https://registry-1.docker.io".to_owned(),
        other => format!("https://{other}"),
    }
}

fn hosts_toml(request: &Request, registry: &str) -> String {
    let mut text = format!(
        "# Written by `gantry configure containerd`: {registry} is pulled through the mirror at\n\
         # {mirror} first, then from the registry itself.\n\
         server = {server}\n\n\
         [host.{host}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        mirror = request.mirror.origin(),
        server = quoted(&server(registry)),
        host = quoted(&request.mirror.origin()),
    );
    if request.insecure {
        text.push_str("  skip_verify = true\n");
    }
    if let Some(ca) = &request.ca {
        text.push_str(&format!("  ca = {}\n", quoted_path(ca)));
    }
    text
}

/// A TOML basic string, escaped.
fn quoted(text: &str) -> String {
    toml_edit::Value::from(text).to_string()
}

fn quoted_path(path: &Path) -> String {
    quoted(&path.display().to_string())
}
