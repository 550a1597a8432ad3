//! `portguard status`: ask the running agent, or read the pinned state.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

/// Show what the running agent enforces: programs, policies with their
/// decision counters, governed cgroups with their pod, container or unit,
/// events written, aggregated and lost, reloads and map occupancy.
///
/// Asks the agent over its status socket (root only). When no agent
/// answers but pinned state exists (--pin-dir), shows what the pinned
/// programs still enforce, from the kernel maps. Exits 1 if neither.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's --status-socket.
    #[arg(long, value_name = "PATH", default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the agent's JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// When no agent answers, read what is still enforced from the pinned
    /// programs and maps in this directory (the agent's --pin-dir).
    #[arg(long, value_name = "DIR", default_value = crate::kernel::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Carry out the verb.
pub fn execute(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let doc = match crate::observe::status::fetch(&a.socket) {
        Ok(doc) => doc,
        // No agent: say what the pinned programs still enforce.
        Err(e) if a.pin_dir.exists() => {
            eprintln!("portguard status: {e:#}; reading the pinned state instead");
            crate::observe::status::pinned_document(&a.pin_dir)?
        }
        Err(e) => return Err(e),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", crate::observe::status::render(&doc));
    }
    Ok(ExitCode::SUCCESS)
}
