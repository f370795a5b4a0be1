//! `gantry rm`, `gantry pin`, `gantry unpin`, `gantry refresh`: changing what the cache holds.
//!
//! Each posts its references in one call and prints one line per reference (or, with `--json`,
//! the API's answer as it came); any reference that failed makes the exit code non-zero, the
//! others still applied.

use std::process::ExitCode;

use serde_json::Value;

use super::{human_size, print_json, run, AdminArgs, AdminClient, CtlError};

pub fn rm(args: &AdminArgs, references: &[String]) -> ExitCode {
    mutate(args, "purge", references, |result| {
        let count = |key: &str| result[key].as_array().map_or(0, Vec::len);
        format!(
            "removed {} tag(s), {} manifest(s), {} blob(s), {} freed",
            count("tags"),
            count("manifests"),
            count("blobs"),
            human_size(result["bytes"].as_u64().unwrap_or(0))
        )
    })
}

pub fn pin(args: &AdminArgs, references: &[String]) -> ExitCode {
    mutate(args, "pin", references, |result| {
        format!(
            "pinned {} digest(s) ({} new); {} pinned in all",
            result["digests"].as_array().map_or(0, Vec::len),
            result["changed"].as_u64().unwrap_or(0),
            human_size(result["pinned_bytes"].as_u64().unwrap_or(0))
        )
    })
}

pub fn unpin(args: &AdminArgs, references: &[String]) -> ExitCode {
    mutate(args, "unpin", references, |result| {
        format!(
            "unpinned {} digest(s); {} pinned in all",
            result["changed"].as_u64().unwrap_or(0),
            human_size(result["pinned_bytes"].as_u64().unwrap_or(0))
        )
    })
}

pub fn refresh(args: &AdminArgs, references: &[String]) -> ExitCode {
    mutate(args, "refresh", references, |result| {
        let after = result["after"].as_str().unwrap_or("?");
        match result["before"].as_str() {
            Some(before) if before == after => format!("unchanged at {after}"),
            Some(before) => format!("{before} -> {after}"),
            None => format!("now {after}"),
        }
    })
}

/// Posts `references` to `/api/v1/{action}` and reports each result with `line`.
fn mutate(
    args: &AdminArgs,
    action: &str,
    references: &[String],
    line: impl Fn(&Value) -> String,
) -> ExitCode {
    run(async {
        let client = match AdminClient::new(args) {
            Ok(client) => client,
            Err(error) => {
                eprintln!("gantry: {error}");
                return ExitCode::FAILURE;
            }
        };
        let body = serde_json::json!({ "references": references });
        let (answer, ok) = match client
            .post_answer(&format!("/api/v1/{action}"), &body)
            .await
        {
            Ok((status, answer)) if status.is_success() => (answer, true),
            // Some references failed, the others applied: each result says which.
            Ok((_, answer)) if answer.get("results").is_some() => (answer, false),
            Ok((status, answer)) => {
                let error = CtlError::Api {
                    status,
                    message: answer["error"]["message"]
                        .as_str()
                        .unwrap_or("no message")
                        .to_owned(),
                };
                eprintln!("gantry: {error}");
                return ExitCode::FAILURE;
            }
            Err(error) => {
                eprintln!("gantry: {error}");
                return ExitCode::FAILURE;
            }
        };
        if args.json {
            print_json(&answer);
        } else {
            for result in answer["results"].as_array().into_iter().flatten() {
                let reference = result["reference"].as_str().unwrap_or("?");
                match result.get("error") {
                    Some(error) => eprintln!(
                        "{reference}: {}",
                        error["message"].as_str().unwrap_or("failed")
                    ),
                    None => println!("{reference}: {}", line(result)),
                }
            }
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}
