//! The setup a new user does, through the real binary: `tunnel init` on each "machine" (its own
//! home and config), then exactly the next steps it prints, until a task runs end to end.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{BIN, curl};

/// One machine: its own HOME, config and data directories.
struct Machine {
    home: tempfile::TempDir,
}

/// What a command printed, and how it ended.
struct Ran {
    status: ExitStatus,
    out: String,
    err: String,
}

impl Machine {
    fn new() -> Machine {
        Machine {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.home.path()
    }

    fn config(&self) -> PathBuf {
        self.path().join(".config/tunnel/tunnel.toml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.path())
            .env("HOME", self.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
        for k in [
            "WORKER_TOKEN",
            "WORKER_URL",
            "TUNNEL_TOKEN",
            "TUNNEL_URL",
            "TUNNEL_CONFIG",
            "PORT",
            "WORKER_PORT",
            "TUNNEL_LISTEN",
            "DATABASE_URL",
        ] {
            cmd.env_remove(k);
        }
        cmd
    }

    /// Runs a command to its end (at most 60 s), with `stdin` as its input.
    fn run(&self, args: &[&str], stdin: &str) -> Ran {
        let out_file = self.path().join(".out");
        let err_file = self.path().join(".err");
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "`tunnel {}` did not end: {}",
                    args.join(" "),
                    std::fs::read_to_string(&err_file).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ran {
            status,
            out: std::fs::read_to_string(&out_file).unwrap(),
            err: std::fs::read_to_string(&err_file).unwrap(),
        }
    }

    /// Starts a long-running command (server, runner), its output in a log file.
    fn start(&self, args: &[&str], log: &str) -> Killed {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path().join(log)).unwrap())
            .stderr(std::fs::File::create(self.path().join(log)).unwrap())
            .spawn()
            .unwrap();
        Killed(child)
    }
}

/// A child process killed when the test ends, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if curl(&[&format!("{url}/healthz")]).0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not come up");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn private(path: &Path) -> bool {
    mode(path) == 0o600
}

/// The lines of `text` that are indented commands, in order.
fn commands_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("  tunnel "))
        .map(str::to_owned)
        .collect()
}

/// Scenario 2 (server in the cloud, runner at home) and 3 (everything remote) are the same
/// steps: `tunnel init` answered through a pipe on the server, the runner command it prints run
/// as printed on a second machine, then a task from the CLI and one the way the plugin sends it.
#[test]
fn server_and_remote_runner_set_up_by_init_run_a_task_end_to_end() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Machine::new();
    let init = server.run(&["init"], &format!("server\n{url}\n"));
    assert!(init.status.success(), "{}{}", init.out, init.err);
    assert!(
        init.out.contains("scenario [local]: server"),
        "the answers show in the transcript: {}",
        init.out
    );
    assert!(
        private(&server.config()),
        "the server's config holds tokens"
    );
    let text = std::fs::read_to_string(server.config()).unwrap();
    assert!(
        text.contains("listen = \"127.0.0.1:3456\"") && !init.out.contains("plain HTTP"),
        "a loopback URL needs no open port: {text}{}",
        init.out
    );
    // The plugin block is valid JSON with the client token and the public URL.
    let start = init.out.find('{').unwrap();
    let end = init.out.rfind("\n}").unwrap() + 2;
    let plugin: Value = serde_json::from_str(&init.out[start..end]).unwrap();
    let plugin = &plugin["plugins"]["entries"]["tunnel"]["config"];
    assert_eq!(plugin["serverUrl"], url.as_str());
    let client_token = plugin["token"].as_str().unwrap().to_owned();
    let steps = commands_in(&init.out);
    let runner_init = steps
        .iter()
        .find(|c| c.starts_with("init --scenario runner"))
        .unwrap_or_else(|| panic!("init prints the runner's command: {}", init.out))
        .clone();
    assert!(steps.iter().any(|c| c == "runner"), "{}", init.out);

    // The server, as printed (`tunnel serve`), on a free loopback port instead of 0.0.0.0:3456
    // (so the server machine's own commands take --server).
    let _serve = server.start(
        &["serve", "--listen", &format!("127.0.0.1:{port}")],
        "serve.log",
    );
    wait_healthy(&url);

    // The runner machine: first a mistyped token, refused before anything is written.
    let home = Machine::new();
    let args: Vec<&str> = runner_init.split_whitespace().collect();
    let mut wrong = args.clone();
    let token_at = wrong.iter().position(|a| *a == "--token").unwrap() + 1;
    wrong[token_at] = "tnl_000000000000_mistyped";
    let refused = home.run(&wrong, "");
    assert!(!refused.status.success());
    assert!(
        refused.err.contains("refuses this token (401)")
            && refused.err.contains("nothing was written"),
        "{}",
        refused.err
    );
    assert!(!home.config().exists());

    // Then exactly the printed command, answering its questions (name, projects).
    std::fs::create_dir_all(home.path().join("src/web")).unwrap();
    let ran = home.run(&args, "box\nweb=src/web\n");
    assert!(ran.status.success(), "{}{}", ran.out, ran.err);
    assert!(ran.out.contains("accepts the token"), "{}", ran.out);
    assert!(
        private(&home.config()),
        "the runner's config holds its token"
    );
    let mut cfg = std::fs::read_to_string(home.config()).unwrap();
    assert!(cfg.contains("name = \"box\""), "{cfg}");
    assert!(
        cfg.contains(&format!(
            "web = \"{}\"",
            home.path()
                .join("src/web")
                .canonicalize()
                .unwrap()
                .display()
        )),
        "{cfg}"
    );
    // A trivial custom agent stands in for an AI CLI.
    cfg.push_str(
        "\n[runner.agents.rev]\nprogram = \"sh\"\ncommand = [\"-c\", \"printf 'reversed: '; rev\"]\n\
         \n[runner.agents.where]\nprogram = \"pwd\"\ncommand = []\n",
    );
    std::fs::write(home.config(), cfg).unwrap();
    let doctor = home.run(&["doctor"], "");
    assert!(doctor.status.success(), "{}{}", doctor.out, doctor.err);
    assert!(doctor.out.contains("its role is runner"), "{}", doctor.out);
    assert!(doctor.out.contains("rev: "), "{}", doctor.out);
    let _runner = home.start(&["runner"], "runner.log");

    // A task from the server machine's CLI (its config holds the admin token), run in the
    // project on the runner.
    let ran = server.run(
        &[
            "submit",
            "--server",
            &url,
            "--agent",
            "rev",
            // The runner, just started on the other machine, may not have claimed yet.
            "--queue-anyway",
            "--project",
            "web",
            "--watch",
            "hello world",
        ],
        "",
    );
    assert!(ran.status.success(), "{}{}", ran.out, ran.err);
    assert!(ran.out.contains("reversed: dlrow olleh"), "{}", ran.out);
    assert!(ran.err.contains("running on box"), "{}", ran.err);
    assert_eq!(
        mode(&home.path().join(".local/share/tunnel")),
        0o700,
        "the runner's spool and work directory hold prompts and answers"
    );

    // It ran in the project directory init wrote.
    let ran = server.run(
        &[
            "submit",
            "--server",
            &url,
            "--agent",
            "where",
            "--project",
            "web",
            "--watch",
            "?",
        ],
        "",
    );
    assert!(ran.status.success(), "{}{}", ran.out, ran.err);
    assert_eq!(
        Path::new(ran.out.trim()),
        home.path().join("src/web").canonicalize().unwrap()
    );

    // A task the way the plugin sends it, with its client token.
    let auth = format!("authorization: Bearer {client_token}");
    let (code, task) = curl(&[
        "-X",
        "POST",
        &format!("{url}/v1/tasks"),
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-H",
        "idempotency-key: discord-msg-1",
        "-d",
        &json!({"agent": "echo", "prompt": "from the plugin", "conversation": "discord:42",
                "session": "continue"})
        .to_string(),
    ]);
    assert_eq!(code, 201, "{task}");
    let id = task["id"].as_str().unwrap();
    let (code, done) = curl(&[&format!("{url}/v1/tasks/{id}?wait=30"), "-H", &auth]);
    assert_eq!(code, 200);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["runner"], "box");
    assert_eq!(done["result"]["text"], "from the plugin");

    // A task no connected runner can take is not left waiting in silence.
    let ran = server.run(
        &[
            "submit",
            "--server",
            &url,
            "--agent",
            "rev",
            "--project",
            "nope",
            "hi",
        ],
        "",
    );
    assert!(ran.status.success(), "{}", ran.err);
    assert!(
        ran.err
            .contains("no connected runner offers agent rev with project nope")
            && ran.err.contains("connected: box ("),
        "{}",
        ran.err
    );
    let ran = server.run(&["cancel", "--server", &url, ran.out.trim()], "");
    assert!(ran.status.success(), "{}", ran.err);

    // The server machine's doctor sees the runner.
    let doctor = server.run(&["doctor", "--server", &url], "");
    assert!(
        // (plus any agent CLI this machine happens to have)
        doctor.out.contains("runners online: box (") && doctor.out.contains("rev, where)"),
        "{}",
        doctor.out
    );
}

/// Where the server listens follows the URL runners use: behind a TLS proxy on loopback, on a
/// private network on every interface (with a warning), and a URL that is none is refused.
#[test]
fn server_init_listens_where_its_public_url_needs() {
    for (url, listen, warns) in [
        ("https://tunnel.example.com", "127.0.0.1:3456", false),
        ("http://10.0.0.5:3456", "0.0.0.0:3456", true),
    ] {
        let m = Machine::new();
        let ran = m.run(
            &["init", "--yes", "--scenario", "server", "--public-url", url],
            "",
        );
        assert!(ran.status.success(), "{}", ran.err);
        let text = std::fs::read_to_string(m.config()).unwrap();
        assert!(
            text.contains(&format!("listen = \"{listen}\"")),
            "{url}: {text}"
        );
        assert_eq!(ran.out.contains("plain HTTP"), warns, "{url}: {}", ran.out);
        assert_eq!(
            ran.out.contains("deploy/Caddyfile"),
            !warns,
            "{url}: {}",
            ran.out
        );
    }
    // --force over a config someone made readable by others leaves it private again.
    let m = Machine::new();
    std::fs::create_dir_all(m.config().parent().unwrap()).unwrap();
    std::fs::write(m.config(), "# mine\n").unwrap();
    std::fs::set_permissions(
        m.config(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let ran = m.run(&["init", "--yes", "--force"], "");
    assert!(ran.status.success(), "{}", ran.err);
    assert!(private(&m.config()));

    let m = Machine::new();
    let ran = m.run(&["init", "--yes", "--scenario", "server"], "");
    assert!(!ran.status.success());
    assert!(ran.err.contains("--public-url is needed"), "{}", ran.err);
    let ran = m.run(
        &[
            "init",
            "--yes",
            "--scenario",
            "server",
            "--public-url",
            "tunnel.example.com",
        ],
        "",
    );
    assert!(!ran.status.success());
    assert!(ran.err.contains("is not a URL"), "{}", ran.err);
    assert!(!m.config().exists(), "nothing written");
}

/// Scenario 1: `tunnel init` then `tunnel up` and the submit it suggests.
#[test]
fn local_setup_by_init_runs_the_suggested_task() {
    let me = Machine::new();
    let init = me.run(&["init", "--yes"], "");
    assert!(init.status.success(), "{}{}", init.out, init.err);
    assert!(private(&me.config()));
    assert!(
        init.out
            .contains("Next: `tunnel up`, then `tunnel submit --agent echo --watch hello`"),
        "{}",
        init.out
    );
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _up = me.start(&["up", "--port", &port.to_string()], "up.log");
    wait_healthy(&url);
    let ran = me.run(
        &[
            "submit", "--server", &url, "--agent", "echo", "--watch", "hello",
        ],
        "",
    );
    assert!(ran.status.success(), "{}{}", ran.out, ran.err);
    assert_eq!(ran.out.trim(), "hello");

    // `tunnel up` names the dashboard; `tunnel dashboard` prints a one-time sign-in link
    // (never the token), which signs a browser in once.
    let log = std::fs::read_to_string(me.path().join("up.log")).unwrap();
    assert!(log.contains(&format!("Dashboard: {url}/ui/")), "{log}");
    let ran = me.run(&["dashboard", "--server", &url, "--no-open"], "");
    assert!(ran.status.success(), "{}{}", ran.out, ran.err);
    let link = ran.out.trim().to_owned();
    let code = link
        .strip_prefix(&format!("{url}/ui/login?code="))
        .unwrap_or_else(|| panic!("not a sign-in link: {link}"));
    assert!(
        code.len() == 32 && code.bytes().all(|b| b.is_ascii_hexdigit()),
        "a code, not a token: {link}"
    );
    let sign_in = || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-D", "-", "-X", "POST"])
            .args([
                "-H",
                &format!("Origin: {url}"),
                "--data",
                &format!("code={code}"),
            ])
            .arg(format!("{url}/ui/login"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let first = sign_in();
    assert!(first.starts_with("HTTP/1.1 303"), "{first}");
    assert!(
        first.to_lowercase().contains("set-cookie: tunnel_session="),
        "{first}"
    );
    let again = sign_in();
    assert!(
        again.starts_with("HTTP/1.1 401"),
        "a code works once: {again}"
    );
}

/// A web server that answers 404 to everything, as a wrong URL or a proxy's wrong route does.
fn not_a_tunnel_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
            );
        }
    });
    url
}

#[test]
fn a_url_that_is_not_a_tunnel_server_is_refused_by_init_and_explained_by_doctor() {
    let url = not_a_tunnel_server();
    let m = Machine::new();
    let ran = m.run(
        &[
            "init",
            "--yes",
            "--scenario",
            "runner",
            "--server",
            &url,
            "--token",
            "tnl_a_b",
        ],
        "",
    );
    assert!(!ran.status.success());
    assert!(
        ran.err.contains("answers HTTP 404 on /healthz") && ran.err.contains("nothing was written"),
        "{}",
        ran.err
    );
    assert!(!m.config().exists());

    let ran = m.run(&["doctor", "--server", &url, "--token", "tnl_a_b"], "");
    assert!(!ran.status.success());
    assert!(
        ran.out
            .contains("answers HTTP 404 on /healthz: that is not a tunnel server"),
        "{}",
        ran.out
    );
}
