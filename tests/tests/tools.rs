//! Every external command that a test, a benchmark or a CI script runs is one that
//! `.ci/setup` installs (from `.ci/packages`), or part of every Debian system and the Rust
//! toolchain. Adding a tool without adding its package fails here, in CI, instead of on a
//! user's fresh machine.
//!
//! Commands are found in Rust sources (`Command::new("…")` and the benchmark's
//! `find_program(&["…"], …)`) and in shell scripts (the first word of every simple command,
//! after quotes, here-documents, expansions and comments are taken out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Commands every Debian system has (packages of priority `required`: bash, coreutils,
/// findutils, grep, sed, mawk, diffutils, libc-bin, dpkg, apt, util-linux), shell builtins
/// and keywords, and the Rust toolchain the README assumes.
const BASE: &[&str] = &[
    // bash builtins and keywords
    ".",
    "[",
    "[[",
    "alias",
    "break",
    "builtin",
    "case",
    "cd",
    "command",
    "compgen",
    "continue",
    "declare",
    "do",
    "done",
    "echo",
    "elif",
    "else",
    "esac",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fi",
    "for",
    "function",
    "getopts",
    "hash",
    "if",
    "in",
    "let",
    "local",
    "mapfile",
    "printf",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "select",
    "set",
    "shift",
    "source",
    "test",
    "then",
    "time",
    "trap",
    "true",
    "type",
    "ulimit",
    "umask",
    "unset",
    "until",
    "wait",
    "while",
    // coreutils, findutils, grep, sed, mawk, diffutils, libc-bin, dpkg, apt, util-linux
    "awk",
    "basename",
    "cat",
    "chmod",
    "chroot",
    "cmp",
    "cp",
    "cut",
    "date",
    "df",
    "diff",
    "dirname",
    "du",
    "env",
    "find",
    "getconf",
    "grep",
    "head",
    "id",
    "ldd",
    "ln",
    "ls",
    "mkdir",
    "mktemp",
    "mv",
    "nproc",
    "od",
    "apt-get",
    "dpkg-query",
    "readlink",
    "realpath",
    "rm",
    "sed",
    "seq",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "tail",
    "tee",
    "timeout",
    "touch",
    "tr",
    "uniq",
    "wc",
    "xargs",
    // bash itself, and the Rust toolchain
    "bash",
    "cargo",
    "rustc",
    "rustup",
];

/// Commands a script calls only behind a `command -v` check, where their absence is fine.
const OPTIONAL: &[&str] = &["systemctl"];

/// Builtins of bash that are also programs elsewhere: provided in scripts, not to `Command`.
const SHELL_BUILTINS: &[&str] = &["kill"];

/// `cargo <sub>` runs the binary `cargo-<sub>` for these; the rest ship with the toolchain.
const CARGO_PLUGINS: &[&str] = &["nextest", "fuzz"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// `.ci/packages`: command → (level, package).
fn manifest() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(root().join(".ci/packages")).expect("read .ci/packages");
    let mut commands = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields.len(),
            5,
            ".ci/packages:{}: want `level kind package version commands`: {line}",
            n + 1
        );
        let (level, kind, package, provides) = (fields[0], fields[1], fields[2], fields[4]);
        assert!(
            ["build", "test", "bench", "deploy"].contains(&level),
            ".ci/packages:{}: unknown level {level}",
            n + 1
        );
        assert!(
            ["deb", "cargo", "pip"].contains(&kind),
            ".ci/packages:{}: unknown kind {kind}",
            n + 1
        );
        for command in provides.split(',').filter(|c| *c != "-") {
            commands.insert(command.to_owned(), (level.to_owned(), package.to_owned()));
        }
    }
    commands
}

/// Files under `dir` (recursively, skipping build output) accepted by `keep`.
fn files(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if !["target", ".git", "corpus", "artifacts"].contains(&name.to_str().unwrap_or("")) {
                files(&path, keep, out);
            }
        } else if keep(&path) {
            out.push(path);
        }
    }
}

/// Shell scripts: `.ci/*` (all bash) and every `*.sh` in the repository.
fn scripts() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(&root().join(".ci"), &|p| is_shell(p), &mut out);
    for dir in [
        "bench",
        "deploy",
        "examples",
        "tests",
        "gateway",
        "dns",
        "federation",
        "core",
    ] {
        files(
            &root().join(dir),
            &|p| p.extension().is_some_and(|e| e == "sh"),
            &mut out,
        );
    }
    out
}

fn is_shell(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.starts_with("#!/usr/bin/env bash"))
}

fn rust_sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [
        "core",
        "federation",
        "dns",
        "gateway",
        "tests",
        "bench",
        "fuzz",
        "policy",
        "admin-api",
        "api",
        "test-support",
    ] {
        files(
            &root().join(dir),
            &|p| p.extension().is_some_and(|e| e == "rs"),
            &mut out,
        );
    }
    out
}

/// Commands a Rust source runs by name: `Command::new("x")` and `find_program(&["x", "y"], …)`
/// (any one of the names is enough there: they are alternatives).
fn rust_commands(src: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for (marker, list) in [("Command::new(\"", false), ("find_program(&[", true)] {
        let mut rest = src;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            if list {
                let end = rest.find(']').unwrap_or(rest.len());
                let names = rest[..end]
                    .split(',')
                    .map(|n| n.trim().trim_matches('"').to_owned())
                    .filter(|n| !n.is_empty())
                    .collect();
                found.push(names);
            } else if let Some(end) = rest.find('"') {
                found.push(vec![rest[..end].to_owned()]);
            }
        }
    }
    found
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Ordinary shell text, or the inside of `$( … )` (`subst`: whether the word after the
    /// substitution is in command position again, as after `A="$(…)" cmd`).
    Code {
        subst: Option<bool>,
    },
    Single,
    Double,
    /// `${ … }` and `$(( … ))`: no commands inside (depth of braces or parentheses).
    Skip {
        close: char,
        open: char,
        depth: u32,
    },
}

/// The first word of every simple command of a bash script, with its line number. Names of
/// functions the script defines, assignments, variables and quoted words are left out.
fn shell_commands(src: &str) -> Vec<(usize, String)> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut stack = vec![Mode::Code { subst: None }];
    let mut word = String::new();
    let mut at_start = true; // the next word is in command position
    let mut skip_next_word = false; // after `for` / `case`: a name, not a command
    let mut line = 1;
    let mut pending_heredocs: Vec<String> = Vec::new();
    let mut i = 0;

    // Ends the current word; decides whether it was a command.
    let finish = |word: &mut String,
                  at_start: &mut bool,
                  skip_next_word: &mut bool,
                  out: &mut Vec<(usize, String)>,
                  line: usize,
                  quoted: bool| {
        if word.is_empty() && !quoted {
            return;
        }
        let w = std::mem::take(word);
        if !*at_start {
            return;
        }
        if *skip_next_word {
            *skip_next_word = false;
            *at_start = false;
            return;
        }
        let is_assignment = w.split_once('=').is_some_and(|(name, _)| {
            let name = name.strip_suffix('+').unwrap_or(name);
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if is_assignment {
            return; // `A=b cmd`: the command is the next word
        }
        match w.as_str() {
            "if" | "then" | "else" | "elif" | "do" | "while" | "until" | "!" | "{" | "}"
            | "time" | "fi" | "done" | "esac" => {}
            "for" | "case" | "select" | "function" => {
                *skip_next_word = true;
            }
            _ => {
                *at_start = false;
                if !quoted && !w.is_empty() {
                    out.push((line, w));
                }
            }
        }
    };

    // Ends the current word (`quoted`: it was a quoted string), in command position or not.
    macro_rules! end_word {
        ($quoted:expr) => {
            finish(
                &mut word,
                &mut at_start,
                &mut skip_next_word,
                &mut out,
                line,
                $quoted,
            )
        };
    }

    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let mode = *stack.last().expect("the base mode is never popped");
        match mode {
            Mode::Single => {
                if c == '\'' {
                    stack.pop();
                }
            }
            Mode::Skip { close, open, depth } => {
                if c == open {
                    *stack.last_mut().expect("non-empty") = Mode::Skip {
                        close,
                        open,
                        depth: depth + 1,
                    };
                } else if c == close {
                    if depth == 1 {
                        stack.pop();
                    } else {
                        *stack.last_mut().expect("non-empty") = Mode::Skip {
                            close,
                            open,
                            depth: depth - 1,
                        };
                    }
                }
            }
            Mode::Double => match c {
                '\\' => i += 1,
                '"' => {
                    stack.pop();
                }
                '$' if next == Some('(') && chars.get(i + 2) != Some(&'(') => {
                    stack.push(Mode::Code {
                        subst: Some(at_start),
                    });
                    at_start = true;
                    i += 1;
                }
                _ => {}
            },
            Mode::Code { subst } => match c {
                '\\' => {
                    i += 1; // an escaped character, or a line continuation
                    if chars.get(i) == Some(&'\n') {
                        line += 1;
                    }
                }
                '#' if word.is_empty() => {
                    while i < chars.len() && chars[i] != '\n' {
                        i += 1;
                    }
                    continue;
                }
                '\'' => {
                    end_word!(true);
                    stack.push(Mode::Single);
                }
                '"' => {
                    end_word!(true);
                    stack.push(Mode::Double);
                }
                '$' if next == Some('{') => {
                    stack.push(Mode::Skip {
                        close: '}',
                        open: '{',
                        depth: 1,
                    });
                    word.push('$');
                    i += 1;
                }
                '$' if next == Some('(') && chars.get(i + 2) == Some(&'(') => {
                    stack.push(Mode::Skip {
                        close: ')',
                        open: '(',
                        depth: 2,
                    });
                    word.push('$');
                    i += 2;
                }
                '$' if next == Some('(') => {
                    end_word!(false);
                    stack.push(Mode::Code {
                        subst: Some(at_start),
                    });
                    at_start = true;
                    i += 1;
                }
                ')' if subst.is_some() => {
                    end_word!(false);
                    stack.pop();
                    at_start = subst.unwrap_or(false);
                }
                ')' => {
                    // `pattern)` of a case, or the end of a subshell or array.
                    word.clear();
                    at_start = true;
                }
                '(' if word.ends_with('=') => {
                    word.clear(); // `name=( … )`: an array, no commands inside
                    stack.push(Mode::Skip {
                        close: ')',
                        open: '(',
                        depth: 1,
                    });
                }
                '(' if at_start && !word.is_empty() => {
                    word.clear(); // `name() {`: a function definition
                }
                '<' if next == Some('<') && chars.get(i + 2) != Some(&'<') => {
                    // A here-document: its body is data, skipped when this line ends.
                    end_word!(false);
                    let mut j = i + 2;
                    while chars.get(j).is_some_and(|c| *c == '-' || *c == ' ') {
                        j += 1;
                    }
                    let mut delim = String::new();
                    while let Some(&d) = chars.get(j) {
                        if d.is_whitespace() || d == ';' || d == '|' || d == '&' || d == '>' {
                            break;
                        }
                        if d != '\'' && d != '"' {
                            delim.push(d);
                        }
                        j += 1;
                    }
                    pending_heredocs.push(delim);
                    i = j;
                    continue;
                }
                '\n' => {
                    end_word!(false);
                    at_start = true;
                    skip_next_word = false;
                    line += 1;
                    for delim in std::mem::take(&mut pending_heredocs) {
                        // Skip whole lines up to and including the delimiter line.
                        loop {
                            let start = i + 1;
                            let end = chars[start.min(chars.len())..]
                                .iter()
                                .position(|c| *c == '\n')
                                .map_or(chars.len(), |p| start + p);
                            let body: String = chars[start.min(chars.len())..end].iter().collect();
                            i = end;
                            if end >= chars.len() {
                                break;
                            }
                            line += 1;
                            if body.trim() == delim {
                                break;
                            }
                        }
                    }
                }
                ';' | '|' | '&' | '(' | '`' => {
                    end_word!(false);
                    // `2>&1` and `&>` redirect; `;;`, `|`, `&&` and `(` start a command.
                    let redirect = c == '&'
                        && (chars.get(i.wrapping_sub(1)) == Some(&'>') || next == Some('>'));
                    if !redirect {
                        at_start = true;
                        skip_next_word = false;
                    }
                }
                c if c.is_whitespace() => {
                    end_word!(false);
                }
                '>' | '<' => {
                    // A redirection: its target is not a command.
                    end_word!(false);
                    i += 1;
                    while chars
                        .get(i)
                        .is_some_and(|c| matches!(c, '>' | '<' | '&' | '='))
                    {
                        i += 1;
                    }
                    while chars.get(i).is_some_and(|c| *c == ' ') {
                        i += 1;
                    }
                    // Read the target (a word, possibly quoted) and drop it.
                    while let Some(&t) = chars.get(i) {
                        if t.is_whitespace() || matches!(t, ';' | '|' | '&' | ')') {
                            break;
                        }
                        if t == '"' || t == '\'' {
                            let q = t;
                            i += 1;
                            while chars.get(i).is_some_and(|c| *c != q) {
                                i += 1;
                            }
                        }
                        i += 1;
                    }
                    continue;
                }
                _ => word.push(c),
            },
        }
        if c == '\n' && !matches!(mode, Mode::Code { .. }) {
            line += 1;
        }
        i += 1;
    }
    end_word!(false);
    out
}

/// A word that names a program on the PATH (not a path, a variable or a function).
fn is_program_name(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.+".contains(c))
}

/// Names of the shell functions a script defines (`name() {`).
fn shell_functions(src: &str) -> BTreeSet<String> {
    src.lines()
        .filter_map(|l| l.trim_start().split_once("()"))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// Commands a script runs that nothing provides: (line, command).
fn unprovided_in_script(src: &str, provided: &BTreeSet<String>) -> Vec<(usize, String)> {
    let functions = shell_functions(src);
    let words = shell_commands(src);
    let mut missing = Vec::new();
    for (line, word) in &words {
        if !is_program_name(word) || functions.contains(word) {
            continue;
        }
        let program = if word == "cargo" {
            cargo_plugin(src, *line)
        } else {
            Some(word.clone())
        };
        if let Some(program) = program
            && !provided.contains(&program)
        {
            missing.push((*line, program));
        }
    }
    missing
}

/// The plugin a `cargo` command on `line` runs (`cargo-nextest`, `cargo-fuzz`), if any.
fn cargo_plugin(src: &str, line: usize) -> Option<String> {
    let text = src.lines().nth(line - 1)?;
    let after = &text[text.find("cargo")? + "cargo".len()..];
    let sub = after.split_whitespace().find(|w| is_program_name(w))?;
    CARGO_PLUGINS.contains(&sub).then(|| format!("cargo-{sub}"))
}

fn provided() -> BTreeSet<String> {
    manifest()
        .into_keys()
        .chain(BASE.iter().chain(OPTIONAL).map(|s| (*s).to_owned()))
        .collect()
}

#[test]
fn every_command_the_tests_and_scripts_run_is_installed_by_setup() {
    let provided = provided();
    let in_scripts: BTreeSet<String> = provided
        .iter()
        .cloned()
        .chain(SHELL_BUILTINS.iter().map(|s| (*s).to_owned()))
        .collect();
    let mut missing = Vec::new();
    let mut seen = BTreeSet::new();

    for path in rust_sources() {
        if path.ends_with("tests/tests/tools.rs") {
            continue; // its own examples are not commands it runs
        }
        let src = std::fs::read_to_string(&path).expect("read source");
        for names in rust_commands(&src) {
            seen.extend(names.iter().cloned());
            if !names.iter().any(|n| provided.contains(n)) {
                missing.push(format!("{}: runs {}", path.display(), names.join(" or ")));
            }
        }
    }
    for path in scripts() {
        let src = std::fs::read_to_string(&path).expect("read script");
        seen.extend(shell_commands(&src).into_iter().map(|(_, w)| w));
        for (line, command) in unprovided_in_script(&src, &in_scripts) {
            missing.push(format!("{}:{line}: runs {command}", path.display()));
        }
    }
    // The scan itself must see the tools we know are used, or it checks nothing.
    for known in [
        "dig", "etcd", "etcdctl", "nginx", "dnsperf", "nsd", "apt-get",
    ] {
        assert!(
            seen.contains(known),
            "the scan no longer finds `{known}`: {seen:?}"
        );
    }
    assert!(
        missing.is_empty(),
        "commands that .ci/packages does not provide (add their package there):\n{}",
        missing.join("\n")
    );
}

/// In CI every tool of the build and test levels is on the PATH: a missing tool is a failure,
/// never a skip.
#[test]
fn every_build_and_test_tool_is_on_the_path() {
    let path = std::env::var_os("PATH").expect("PATH is set");
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let mut absent = Vec::new();
    for (command, (level, package)) in manifest() {
        // bench and deploy are optional levels (`.ci/setup bench`, `.ci/setup deploy`).
        if level == "bench" || level == "deploy" {
            continue;
        }
        if !dirs.iter().any(|d| d.join(&command).is_file()) {
            absent.push(format!(
                "{command} (package {package}): run `bash .ci/setup test`"
            ));
        }
    }
    assert!(
        absent.is_empty(),
        "missing on the PATH:\n{}",
        absent.join("\n")
    );
}

#[test]
fn the_script_scan_finds_commands_and_only_commands() {
    let script = r#"#!/usr/bin/env bash
set -euo pipefail
cleanup() { kill "$pid" 2>/dev/null || true; }
A=1 B="$(jq -r .x <<<"$json")" frob --flag 2>&1 | sort
for tool in nsd dig; do command -v "$tool" >/dev/null || exit 1; done
case "$1" in
  build) levels="build" ;;
  *) echo "no" >&2 ;;
esac
cat >"$dir/x.conf" <<CONF
server:
  notacommand here
CONF
x=$((a + b)); y="${z:-0}"
if ! cargo +nightly fuzz list --dir "$d"; then
  python3 -c 'import os
print(1)'
fi
arr=(--rounds 3)
echo "a; b | c" && wget -q url # a comment: ignored
"#;
    let words: Vec<String> = shell_commands(script).into_iter().map(|(_, w)| w).collect();
    assert_eq!(
        words,
        [
            "set", "kill", "true", "jq", "frob", "sort", "command", "exit", "echo", "cat", "cargo",
            "python3", "echo", "wget"
        ],
    );
    let provided: BTreeSet<String> = BASE
        .iter()
        .chain(SHELL_BUILTINS)
        .map(|s| (*s).to_owned())
        .collect();
    let missing: Vec<String> = unprovided_in_script(script, &provided)
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    assert_eq!(missing, ["jq", "frob", "cargo-fuzz", "python3", "wget"]);
}
