//! The `durable-stream` binary against the real server binary.

#![allow(clippy::unwrap_used)]

#[path = "../../client/tests/common/mod.rs"]
mod common;

use common::{name, Server};
use std::io::Write;
use std::process::{Command, Output, Stdio};

const CLI: &str = env!("CARGO_BIN_EXE_durable-stream");

fn cli(srv: &Server, args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .env("STREAM_URL", srv.base())
        .env_remove("STREAM_AUTH")
        .output()
        .unwrap()
}

fn cli_stdin(srv: &Server, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(CLI)
        .args(args)
        .env("STREAM_URL", srv.base())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// create, write (argument with escapes), read --no-follow, head, close, fork and delete work end to end.
#[test]
fn every_command() {
    let srv = Server::start(&[]);
    let id = format!("dir/{}", name("cli"));
    ok(&cli(&srv, &["create", &id, "--content-type", "text/plain"]));
    ok(&cli(&srv, &["write", &id, "line one\\nline two\\t!"]));
    assert_eq!(
        ok(&cli(&srv, &["read", &id, "--no-follow"])),
        "line one\nline two\t!"
    );
    let head = ok(&cli(&srv, &["head", &id]));
    assert!(
        head.contains("content-type: text/plain") && head.contains("closed: false"),
        "{head}"
    );
    let fork = name("fork");
    ok(&cli(&srv, &["fork", &id, &fork]));
    let final_offset = ok(&cli(&srv, &["close", &id, "\\nbye"]));
    assert!(
        ok(&cli(&srv, &["head", &id])).contains(&format!("next-offset: {}", final_offset.trim()))
    );
    assert_eq!(
        ok(&cli(&srv, &["read", &id])),
        "line one\nline two\t!\nbye",
        "read ends at closure"
    );
    assert_eq!(
        ok(&cli(&srv, &["read", &fork, "--no-follow"])),
        "line one\nline two\t!"
    );
    ok(&cli(&srv, &["delete", &id]));
    ok(&cli(&srv, &["delete", &fork]));
}

/// Exit codes: 3 for a missing stream, 4 for a conflict or a closed stream, 5 when the server is unreachable, 2 for usage.
#[test]
fn exit_codes() {
    let srv = Server::start(&[]);
    let missing = name("missing");
    assert_eq!(cli(&srv, &["head", &missing]).status.code(), Some(3));
    assert_eq!(
        cli(&srv, &["read", &missing, "--no-follow"]).status.code(),
        Some(3)
    );
    let id = name("conf");
    ok(&cli(&srv, &["create", &id]));
    assert_eq!(cli(&srv, &["create", &id, "--json"]).status.code(), Some(4));
    ok(&cli(&srv, &["close", &id]));
    assert_eq!(cli(&srv, &["write", &id, "x"]).status.code(), Some(4));
    assert_eq!(cli(&srv, &["bogus"]).status.code(), Some(2));
    let out = Command::new(CLI)
        .args(["--url", "http://127.0.0.1:1/v1/stream", "head", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
}

/// JSON: --json stores one message, --batch-json one per element; read prints one JSON value per line.
#[test]
fn json_writes() {
    let srv = Server::start(&[]);
    let id = name("json");
    ok(&cli(&srv, &["create", &id, "--json"]));
    ok(&cli(
        &srv,
        &["write", &id, r#"{"event": "user.created"}"#, "--json"],
    ));
    ok(&cli(&srv, &["write", &id, "[1, 2]", "--json"]));
    ok(&cli(
        &srv,
        &["write", &id, r#"[{"a": 1}, {"a": 2}]"#, "--batch-json"],
    ));
    ok(&cli_stdin(
        &srv,
        &["write", &id, "--json"],
        b"{\"from\":\"stdin\"}\n",
    ));
    let out = ok(&cli(&srv, &["read", &id, "--no-follow"]));
    assert_eq!(
        out,
        "{\"event\": \"user.created\"}\n[1, 2]\n{\"a\": 1}\n{\"a\": 2}\n{\"from\":\"stdin\"}\n"
    );
    assert_eq!(
        cli(&srv, &["write", &id, "{oops", "--json"]).status.code(),
        Some(2)
    );
}

/// Large stdin (several MiB, beyond one batch) is written completely and exactly once; --close closes it.
#[test]
fn large_stdin() {
    let srv = Server::start(&[]);
    let id = name("big");
    ok(&cli(&srv, &["create", &id]));
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    ok(&cli_stdin(&srv, &["write", &id, "--close"], &data));
    let got = Command::new(CLI)
        .args(["read", &id])
        .env("STREAM_URL", srv.base())
        .output()
        .unwrap();
    assert!(got.status.success());
    assert_eq!(got.stdout.len(), data.len());
    assert!(got.stdout == data);
    assert!(ok(&cli(&srv, &["head", &id])).contains("closed: true"));
}

/// `read` follows live data from `--from now` and exits 0 when the stream is closed.
#[test]
fn read_follows_until_closed() {
    let srv = Server::start(&["--long-poll-timeout", "1s"]);
    let id = name("follow");
    ok(&cli(&srv, &["create", &id, "--content-type", "text/plain"]));
    ok(&cli(&srv, &["write", &id, "old "]));
    let reader = Command::new(CLI)
        .args(["read", &id, "--from", "now", "--live", "long-poll"])
        .env("STREAM_URL", srv.base())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    ok(&cli(&srv, &["write", &id, "new"]));
    ok(&cli(&srv, &["close", &id]));
    let out = reader.wait_with_output().unwrap();
    assert!(out.status.success());
    // Whether "new" arrives depends on when the reader resolved "now"; "old " never does.
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text == "new" || text.is_empty(), "{text:?}");
}
