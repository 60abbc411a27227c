//! `tunnel`: the server, the client commands (and later the runner) in one binary.
//!
//! This is the edge: configuration is read here, errors become one readable line and an
//! exit code here.

mod acp;
mod approvals;
mod cli;
mod commands;
mod config;
mod doctor;
mod init;
mod logjson;
mod output;
mod resident;
mod runner;
mod sandbox;
mod serve;
mod service;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything reads a secret: other processes of this user (an agent) cannot read
    // this one's environment or memory.
    sandbox::not_dumpable();
    let mut argv = std::env::args_os();
    if argv.nth(1).is_some_and(|a| a == sandbox::SUBCOMMAND) {
        return sandbox::main(argv.collect());
    }
    // `tunnel tasks | head` closes stdout early: that is not an error worth a panic message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or_default();
        if msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::visible(&error_line(&e)));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors repeat their source in
/// their own message ("cannot listen: Address in use: Address in use").
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
