//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not an API: they expose
//! the crate's parsers of untrusted input to the fuzzer, nothing else.

use std::path::Path;

use serde_json::Value;
use tunnel_protocol::TaskResult;

use crate::adapter::{self, Exit, InvocationInput, Verdict};
use crate::config::{AgentConfig, AgentKind, OutputMode};

/// What a parser made of an agent's output.
#[derive(Debug)]
pub struct Parsed {
    /// Each event's kind and data, in order.
    pub events: Vec<(String, Value)>,
    pub succeeded: bool,
    pub result: TaskResult,
}

/// Feeds `lines` to the parser of `kind` (custom agents read in `output` mode), then ends the
/// run with this exit.
pub fn agent_output(
    kind: AgentKind,
    output: OutputMode,
    lines: &[&str],
    code: Option<i32>,
    signal: Option<i32>,
    stderr_tail: &str,
) -> Parsed {
    let mut agent = AgentConfig::builtin(kind, "agent");
    agent.output = output;
    let mut parser = adapter::parser(&agent);
    let mut events = Vec::new();
    for line in lines {
        for e in parser.line(line) {
            events.push((e.kind.to_owned(), e.data));
        }
    }
    let exit = Exit {
        code,
        signal,
        stderr_tail: stderr_tail.to_owned(),
    };
    let (succeeded, result) = match parser.finish(&exit) {
        Verdict::Succeeded(r) => (true, r),
        Verdict::Failed(r, _) => (false, r),
    };
    Parsed {
        events,
        succeeded,
        result,
    }
}

/// The argv and stdin the runner would start `agent` with.
pub fn invocation(
    agent: &AgentConfig,
    prompt: &str,
    model: Option<&str>,
    resume: Option<&str>,
) -> (String, Vec<String>, Option<String>) {
    let inv = adapter::invocation(
        agent,
        &InvocationInput {
            prompt,
            model,
            resume,
            task_id: "0193a0b0-0000-7000-8000-000000000000",
            project_dir: Path::new("/tmp/project"),
        },
    );
    (inv.program, inv.args, inv.stdin)
}

/// A file task (read, write, edit) in `project`, with the runner's default options.
pub fn file_request(project: &Path, prompt: &str) -> Result<String, String> {
    crate::files::run(project, prompt, crate::files::Options::default())
}
