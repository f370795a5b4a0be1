//! `gantry ls`, `gantry inspect`, `gantry stats`: reading what the cache holds.

use std::process::ExitCode;

use super::AdminArgs;

/// `gantry ls`: filters are globs over registry and repository (`docker.io`, `library/*`).
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub registry: Option<String>,
    pub repository: Option<String>,
    pub limit: Option<usize>,
}

pub fn ls(_args: &AdminArgs, _filter: &ListFilter) -> ExitCode {
    eprintln!("gantry ls: not built yet");
    ExitCode::FAILURE
}

pub fn inspect(_args: &AdminArgs, _image: &str) -> ExitCode {
    eprintln!("gantry inspect: not built yet");
    ExitCode::FAILURE
}

pub fn stats(_args: &AdminArgs) -> ExitCode {
    eprintln!("gantry stats: not built yet");
    ExitCode::FAILURE
}
