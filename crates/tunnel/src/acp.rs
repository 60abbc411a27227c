//! `tunnel acp`: a stdio ACP (v1) agent that any ACP client (Zed, acpx, OpenClaw through
//! acpx) launches, and that runs each prompt as a durable task on a remote runner. The bridge
//! itself is `tunnel-acp` (shared with the server's `/acp`); this is its stdio edge: flags and
//! config in, the client token's API client out.

use std::process::ExitCode;

use anyhow::Result;
use tunnel_acp::{Limits, Settings};
use tunnel_protocol::ApprovalPolicy;

use crate::cli::{AcpArgs, PolicyArg};
use crate::config::FileConfig;

pub(crate) async fn run(args: AcpArgs, file: &FileConfig) -> Result<ExitCode> {
    // Warnings (a cancel or an approval answer the server refused) go to stderr, which ACP
    // clients show or log; stdout is the protocol's.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let client = crate::commands::connect(&args.client, &file.client)?;
    let mut project_flag = args.project;
    if let Some(p) = &project_flag {
        tunnel_protocol::validate_name("project", p)
            .map_err(|e| anyhow::anyhow!("--project: {e}"))?;
    }
    tunnel_protocol::validate_name("agent", &args.agent)
        .map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
    if let Some(r) = &args.runner {
        tunnel_protocol::validate_name("runner", r)
            .map_err(|e| anyhow::anyhow!("--runner: {e}"))?;
    }
    project_flag = project_flag.or(file.acp.project.clone());
    let settings = Settings {
        client,
        agent: args.agent,
        runner: args.runner.or(file.acp.runner.clone()),
        project: project_flag,
        policy: Some(match args.approvals.unwrap_or(PolicyArg::Ask) {
            PolicyArg::Ask => ApprovalPolicy::Ask,
            PolicyArg::Auto => ApprovalPolicy::Auto,
            PolicyArg::Deny => ApprovalPolicy::Deny,
        }),
        projects: file.acp.projects.clone(),
    };
    tunnel_acp::serve_lines(
        settings,
        Limits::default(),
        tokio::io::stdin(),
        tokio::io::stdout(),
    )
    .await;
    Ok(ExitCode::SUCCESS)
}
