//! `registries.conf` (v2, read by podman, CRI-O, buildah and skopeo): per registry a
//! `[[registry]]` with `prefix` and `location`, and gantry first among its `[[registry.mirror]]`
//! entries. Docker Hub's mirror location is gantry itself (`mirror:5000`); any other registry's
//! carries the registry as a path prefix (`mirror:5000/ghcr.io`), which is how gantry tells the
//! registries apart here (these clients send no `ns=`). Edited with toml_edit, so every other
//! table, key and comment stays as it was.

use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use super::{read_existing, Change, Error, Plan, Request};

pub(super) fn plan(request: &Request) -> Result<Plan, Error> {
    let path = &request.path;
    let authority = request.mirror.authority();
    if !request.mirror.is_https() && !request.insecure {
        return Err(Error::Usage(format!(
            "--mirror {}: registries.conf has no scheme, so podman reaches a plain-HTTP mirror only \
             with `insecure = true`: add --insecure",
            request.mirror.origin()
        )));
    }
    for registry in &request.registries {
        if registry != "docker.io" && registry.contains(':') {
            return Err(Error::Usage(format!(
                "--registry {registry}: a registry with a port cannot be a mirror path prefix \
                 ({authority}/{registry} is not a valid location); give it a port-less `host:` in \
                 gantry's registries: and name that"
            )));
        }
    }
    let mut warnings = Vec::new();
    if let Some(ca) = &request.ca {
        warnings.push(format!(
            "registries.conf has no CA setting: copy {} to /etc/containers/certs.d/{authority}/ca.crt",
            ca.display()
        ));
    }
    let before = read_existing(path)?;
    let mut doc: DocumentMut = match before.as_deref() {
        None => DocumentMut::new(),
        Some(text) => text
            .parse()
            .map_err(|e| Error::malformed(path, format!("not TOML: {e}")))?,
    };
    if doc.get("registries").is_some_and(Item::is_table_like) {
        return Err(Error::malformed(
            path,
            "version 1 format ([registries.search] and friends): convert it to version 2 \
             ([[registry]] tables) first",
        ));
    }
    let tables = doc
        .entry("registry")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or_else(|| Error::malformed(path, "`registry` is not a list of [[registry]] tables"))?;
    for registry in &request.registries {
        let location = if registry == "docker.io" {
            authority.to_owned()
        } else {
            format!("{authority}/{registry}")
        };
        let found = tables.iter_mut().find(|table| {
            let prefix = table.get("prefix").and_then(Item::as_str);
            let primary = table.get("location").and_then(Item::as_str);
            prefix == Some(registry) || (prefix.is_none() && primary == Some(registry))
        });
        match found {
            Some(table) => add_mirror(table, &location, request.insecure).map_err(|message| {
                Error::malformed(path, format!("[[registry]] {registry}: {message}"))
            })?,
            None => {
                let mut table = Table::new();
                table["prefix"] = value(registry.as_str());
                table["location"] = value(registry.as_str());
                let mut mirrors = ArrayOfTables::new();
                mirrors.push(mirror(&location, request.insecure));
                table["mirror"] = Item::ArrayOfTables(mirrors);
                tables.push(table);
            }
        }
    }
    let after = if before.is_none() {
        format!(
            "# Written by `gantry configure podman`: pulls go through the gantry mirror first.\n{doc}"
        )
    } else {
        doc.to_string()
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

fn mirror(location: &str, insecure: bool) -> Table {
    let mut table = Table::new();
    table["location"] = value(location);
    if insecure {
        table["insecure"] = value(true);
    }
    table
}

/// gantry's mirror in `table`'s `[[registry.mirror]]` list: kept where it is when already there
/// (made `insecure` if asked), otherwise put first, since mirrors are tried in order.
fn add_mirror(table: &mut Table, location: &str, insecure: bool) -> Result<(), String> {
    let mirrors = table
        .entry("mirror")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or("`mirror` is not a list of [[registry.mirror]] tables")?;
    let existing = mirrors
        .iter_mut()
        .find(|m| m.get("location").and_then(Item::as_str) == Some(location));
    if let Some(existing) = existing {
        if insecure && existing.get("insecure").and_then(Item::as_bool) != Some(true) {
            existing["insecure"] = value(true);
        }
        return Ok(());
    }
    let others: Vec<Table> = mirrors.iter().cloned().collect();
    let mut reordered = ArrayOfTables::new();
    reordered.push(mirror(location, insecure));
    for other in others {
        reordered.push(other);
    }
    *mirrors = reordered;
    Ok(())
}
