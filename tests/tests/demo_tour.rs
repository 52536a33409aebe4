//! The demo's guided tour, run as a new user would: `meshup demo` as a real process, then
//! every command line its tour prints (`  $ …`), run by bash as printed with `meshup` on the
//! PATH, and its client loop (a real curl) kept running throughout. It checks what the tour
//! promises: the client never fails; a `fail` drill on west moves every new connection to
//! north; after the drill ends, west gets traffic again only after the policy's hold-down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshup_tests::meshup_bin;
use meshup_tests::procs::ChildGuard;

/// The failback hold-down of the demo's pay.prod policy (the tour says so too).
const HOLD_DOWN: Duration = Duration::from_secs(10);

/// A log file read as it grows: each complete line with the instant it was first seen.
struct Lines {
    path: PathBuf,
    read: usize,
    lines: Vec<(Instant, String)>,
}

impl Lines {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            read: 0,
            lines: Vec::new(),
        }
    }

    /// Takes in the lines written since the last call.
    fn poll(&mut self) -> &[(Instant, String)] {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let now = Instant::now();
        let complete = text[self.read..]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(self.read, |end| self.read + end + 1);
        for line in String::from_utf8_lossy(&text[self.read..complete]).lines() {
            self.lines.push((now, line.to_owned()));
        }
        self.read = complete;
        &self.lines
    }

    fn text(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls until `done` holds for the lines so far; panics with them after `limit`.
    fn wait(&mut self, what: &str, limit: Duration, done: impl Fn(&[(Instant, String)]) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self.poll()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; {} so far:\n{}",
                self.path.display(),
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The cluster of one client-loop answer line (`hello from pay.prod in cluster west (you came
/// from …)`), or a panic naming the bad line.
fn served_by(line: &str) -> &str {
    let cluster = line
        .strip_prefix("hello from pay.prod in cluster ")
        .and_then(|rest| rest.split_whitespace().next());
    match cluster {
        Some(cluster @ ("west" | "north")) => cluster,
        _ => panic!("the tour's client loop printed {line:?}: wanted an answer from west or north"),
    }
}

/// Answers of the client loop that arrived after `after`.
fn answers_after(lines: &[(Instant, String)], after: Instant) -> Vec<&str> {
    lines
        .iter()
        .filter(|(at, _)| *at > after)
        .map(|(_, l)| served_by(l))
        .collect()
}

/// Runs one tour line with bash as a user's shell would: `meshup` on the PATH and the
/// environment the tour's `export` set. Returns stdout; panics on a non-zero exit.
fn shell(line: &str, env: &[(String, String)]) -> String {
    let bin_dir = meshup_bin().parent().expect("bin dir").to_owned();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = Command::new("bash")
        .args(["-c", line])
        .env("PATH", path)
        .env("USER", "tour-user")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tour command `{line}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_tour_works_as_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(meshup_bin());
    cmd.arg("demo").env("MESHUP_LOG", "warn");
    let demo_log = dir.path().join("demo.log");
    let mut demo = ChildGuard::spawn("meshup demo", cmd, &demo_log).expect("start the demo");
    let mut out = Lines::new(&demo_log);
    out.wait("the demo runs", Duration::from_secs(60), |l| {
        l.iter().any(|(_, l)| l.starts_with("Running."))
    });
    let commands: Vec<String> = out
        .lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("  $ "))
        .map(str::to_owned)
        .collect();
    let find = |prefix: &str| -> Vec<&String> {
        commands.iter().filter(|c| c.starts_with(prefix)).collect()
    };
    let [export] = find("export MESHUP_ADMIN=")[..] else {
        panic!(
            "one `export MESHUP_ADMIN=` line in the tour:\n{}",
            out.text()
        );
    };
    let admin = export.trim_start_matches("export MESHUP_ADMIN=");
    let env = vec![("MESHUP_ADMIN".to_owned(), admin.to_owned())];
    let [client] = find("while ")[..] else {
        panic!("one client loop in the tour:\n{}", out.text());
    };
    let [start] = find("meshup drill start ")[..] else {
        panic!("one drill start in the tour:\n{}", out.text());
    };
    let [stop] = find("meshup drill stop ")[..] else {
        panic!("one drill stop in the tour:\n{}", out.text());
    };
    let resolve = find("meshup resolve ");
    assert!(
        !resolve.is_empty(),
        "a resolve in the tour:\n{}",
        out.text()
    );
    let resolve = resolve[0];

    // 1. The client loop, as printed, in its own process group.
    let mut loop_cmd = Command::new("bash");
    loop_cmd.args(["-c", client]);
    let client_log = dir.path().join("client.log");
    let _client = ChildGuard::spawn("the tour's client loop", loop_cmd, &client_log)
        .expect("start the client loop");
    let mut answers = Lines::new(&client_log);
    answers.wait("the client's first answers", Duration::from_secs(10), |l| {
        l.len() >= 3
    });

    // 2. Resolve: both clusters take pay.prod's traffic, by its policy.
    let text = shell(resolve, &env);
    assert!(
        text.contains("west") && text.contains("north"),
        "resolve before the drill:\n{text}"
    );
    for line in commands.iter().filter(|c| {
        c.starts_with("meshup ")
            && !c.starts_with("meshup drill")
            && !c.starts_with("meshup resolve")
    }) {
        shell(line, &env);
    }

    // 3. Fail west. Once resolve says so, every new connection goes to north.
    shell(start, &env);
    let text = shell(resolve, &env);
    assert!(
        text.contains("order: north\n")
            && text.contains("failed by a drill of tour-user: demo tour"),
        "resolve during the drill names it:\n{text}"
    );
    let applied = Instant::now();
    answers.wait(
        "five answers after the drill is in force",
        Duration::from_secs(15),
        |l| answers_after(l, applied + Duration::from_secs(1)).len() >= 5,
    );
    let during = answers_after(&answers.lines, applied + Duration::from_secs(1));
    assert!(
        during.iter().all(|c| *c == "north"),
        "during the fail drill on west, answers came from {during:?}"
    );
    let list = shell("meshup drill list", &env);
    assert!(list.contains("tour-west"), "drill list:\n{list}");

    // 4. Stop it: west again, but only after the hold-down.
    shell(stop, &env);
    let stopped = Instant::now();
    answers.wait(
        "an answer from west again",
        HOLD_DOWN + Duration::from_secs(15),
        |l| answers_after(l, stopped).contains(&"west"),
    );
    let first_west = answers
        .lines
        .iter()
        .find(|(at, l)| *at > stopped && served_by(l) == "west")
        .map(|(at, _)| *at)
        .expect("seen above");
    assert!(
        first_west.duration_since(stopped) >= HOLD_DOWN - Duration::from_millis(500),
        "west got traffic {:?} after the drill ended, before the {HOLD_DOWN:?} hold-down",
        first_west.duration_since(stopped)
    );
    let list = shell("meshup drill list -o json", &env);
    assert!(
        list.contains("tour-west") && list.contains("stopped"),
        "the audit trail has the stopped drill:\n{list}"
    );

    // Every answer of the client loop, throughout, came from a cluster serving pay.prod (a
    // curl error would be a line `served_by` refuses).
    let total = answers.poll().len();
    answers.lines.iter().for_each(|(_, l)| {
        served_by(l);
    });
    assert!(total >= 10, "the client answered {total} times");

    // Ctrl-C drains the federation and exits 0.
    demo.signal_group("INT").expect("SIGINT");
    out.wait("the demo drains", Duration::from_secs(30), |l| {
        l.iter().any(|(_, l)| l.starts_with("Draining"))
    });
    demo.wait_exit(Duration::from_secs(30))
        .expect("the demo exits 0 after Ctrl-C");
}
