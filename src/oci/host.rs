//! Registry host names as clients write them: which path component names a registry, and which
//! names mean Docker Hub.

/// The names Docker Hub goes by in image references, `config.json` keys and URLs.
pub const DOCKER_HUB_NAMES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Docker Hub, under any of its names (`docker.io` or a host below it).
pub fn is_docker_hub(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host == "docker.io" || host.ends_with(".docker.io")
}

/// A first path component is a registry host if it is a host name (with a dot or a port) or
/// `localhost`, the rule docker's reference parser uses. `..` is not a host.
pub fn looks_like_host(component: &str) -> bool {
    let (host, port) = match component.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (component, None),
    };
    let labels_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && port_ok && (host.contains('.') || port.is_some() || host == "localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_told_from_repository_components() {
        for host in [
            "ghcr.io",
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "a-b.example.com",
            "registry-1.docker.io",
        ] {
            assert!(looks_like_host(host), "{host}");
        }
        for not_host in [
            "library", "..", ".", "a..b", "ghcr.io:", ":5000", "a_b.io", "x:y", "my-app", "host:",
            "a.b:x",
        ] {
            assert!(!looks_like_host(not_host), "{not_host}");
        }
    }

    #[test]
    fn docker_hub_goes_by_several_names() {
        for name in DOCKER_HUB_NAMES {
            assert!(is_docker_hub(name), "{name}");
        }
        assert!(is_docker_hub("Registry-1.Docker.IO"));
        assert!(!is_docker_hub("ghcr.io"));
        assert!(!is_docker_hub("notdocker.io"));
    }
}
