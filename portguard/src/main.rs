use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use portguard::{cli::Cli, observe::text::escape};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        // env_logger's default layout, with the message escaped: log lines
        // carry cgroup, unit and pod names that tenants choose, and one
        // escape here covers every call site (a newline in a name cannot
        // forge a line, an ESC sequence cannot repaint the terminal).
        .format(|buf, record| {
            let style = buf.default_level_style(record.level());
            let level = record.level();
            let message = match record.args().as_str() {
                Some(s) => escape(s).into_owned(),
                None => escape(&record.args().to_string()).into_owned(),
            };
            writeln!(
                buf,
                "[{} {style}{level:<5}{style:#} {}] {message}",
                buf.timestamp_millis(),
                escape(record.target()),
            )
        })
        .init();
    match Cli::parse().execute() {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
