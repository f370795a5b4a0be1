//! `gantry rm`, `gantry pin`, `gantry unpin`, `gantry refresh`: changing what the cache holds.

use std::process::ExitCode;

use super::AdminArgs;

pub fn rm(_args: &AdminArgs, _references: &[String]) -> ExitCode {
    eprintln!("gantry rm: not built yet");
    ExitCode::FAILURE
}

pub fn pin(_args: &AdminArgs, _references: &[String]) -> ExitCode {
    eprintln!("gantry pin: not built yet");
    ExitCode::FAILURE
}

pub fn unpin(_args: &AdminArgs, _references: &[String]) -> ExitCode {
    eprintln!("gantry unpin: not built yet");
    ExitCode::FAILURE
}

pub fn refresh(_args: &AdminArgs, _references: &[String]) -> ExitCode {
    eprintln!("gantry refresh: not built yet");
    ExitCode::FAILURE
}
