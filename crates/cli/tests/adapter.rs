//! The `client-conformance-adapter` binary driven over stdin/stdout, as the
//! client conformance runner drives it, against the real server binary:
//! every command of the adapter protocol, checking the result fields the
//! protocol document specifies.

#![allow(clippy::unwrap_used)]

#[path = "../../client/tests/common/mod.rs"]
mod common;

use base64::Engine as _;
use common::{name, Server};
use durable_streams_client::{CreateOptions, DurableStream, ProducerOptions, StreamOptions};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const ADAPTER: &str = env!("CARGO_BIN_EXE_client-conformance-adapter");

/// The server's long-poll timeout is 500 ms, as in the conformance runner.
fn server() -> Server {
    Server::start(&["--long-poll-timeout", "500ms"])
}

struct Adapter {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Adapter {
    fn spawn() -> Adapter {
        let mut child = Command::new(ADAPTER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the adapter");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Adapter {
            child,
            stdin,
            stdout,
        }
    }

    /// Spawned and initialised against `server_url`.
    fn start(server_url: &str) -> Adapter {
        let mut a = Adapter::spawn();
        let r = a.send(json!({"type": "init", "serverUrl": server_url}));
        ok(&r, "init");
        a
    }

    fn write_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a command without waiting (a "background" read).
    fn write(&mut self, cmd: Value) {
        self.write_line(&serde_json::to_string(&cmd).unwrap());
    }

    /// The next reply: exactly one compact JSON object on one LF-terminated line.
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "the adapter closed stdout");
        assert!(
            line.ends_with('\n') && !line[..line.len() - 1].contains(['\n', '\r']),
            "one line: {line:?}"
        );
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(
            !line.contains(":null"),
            "absent fields are omitted, never null: {line}"
        );
        v
    }

    fn send(&mut self, cmd: Value) -> Value {
        self.write(cmd);
        self.recv()
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[track_caller]
fn ok<'a>(r: &'a Value, ty: &str) -> &'a Value {
    assert_eq!(r["type"], ty, "{r}");
    assert_eq!(r["success"], true, "{r}");
    r
}

#[track_caller]
fn err(r: &Value, code: &str, status: Option<u64>) {
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(r["errorCode"], code, "{r}");
    assert!(r["message"].is_string(), "{r}");
    match status {
        Some(s) => assert_eq!(r["status"], s, "{r}"),
        None => assert!(
            r.get("status").is_none(),
            "no status without an HTTP response: {r}"
        ),
    }
}

/// Concatenated chunk data of a successful read, after checking the fields every read result carries.
#[track_caller]
fn read_data(r: &Value) -> String {
    ok(r, "read");
    assert!(
        r["offset"].as_str().is_some_and(|o| !o.is_empty()),
        "offset: {r}"
    );
    assert!(
        r["upToDate"].is_boolean() && r["streamClosed"].is_boolean() && r["status"].is_u64(),
        "{r}"
    );
    r["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["data"].as_str().unwrap().to_string())
        .collect()
}

fn chunk_count(r: &Value) -> usize {
    r["chunks"].as_array().unwrap().len()
}

fn path(prefix: &str) -> String {
    format!("/{}", name(prefix))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// init reports name, version and boolean feature flags; bad lines, unknown types and shutdown get exactly one reply each.
#[test]
fn init_transport_and_shutdown() {
    let srv = server();
    let mut a = Adapter::spawn();
    let r = a.send(json!({"type": "init", "serverUrl": srv.base()}));
    ok(&r, "init");
    assert!(
        r["clientName"].is_string() && r["clientVersion"].is_string(),
        "{r}"
    );
    for f in [
        "sse",
        "longPoll",
        "auto",
        "dynamicHeaders",
        "batching",
        "retryOptions",
        "batchItems",
        "strictZeroValidation",
    ] {
        assert_eq!(r["features"][f], true, "feature {f}: {r}");
    }
    a.write_line("this is not json");
    err(&a.recv(), "PARSE_ERROR", None);
    a.write_line(r#"{"no":"type"}"#);
    err(&a.recv(), "PARSE_ERROR", None);
    err(
        &a.send(json!({"type": "create", "path": 42})),
        "PARSE_ERROR",
        None,
    );
    err(
        &a.send(json!({"type": "teleport", "path": "/x"})),
        "NOT_SUPPORTED",
        None,
    );
    err(
        &a.send(json!({"type": "server-close", "path": "/x", "streamClosed": true})),
        "NOT_SUPPORTED",
        None,
    );
    // Unknown fields in commands are tolerated.
    ok(
        &a.send(json!({"type": "create", "path": path("extra"), "someFutureField": [1, 2]})),
        "create",
    );
    // A second init resets state and still works.
    ok(
        &a.send(json!({"type": "init", "serverUrl": format!("{}/", srv.base())})),
        "init",
    );
    assert_eq!(
        a.send(json!({"type": "shutdown"})),
        json!({"type": "shutdown", "success": true})
    );
    assert!(
        a.child.wait().unwrap().success(),
        "exit status 0 after shutdown"
    );

    // EOF on stdin also ends the adapter cleanly.
    let mut b = Adapter::spawn();
    drop(b.stdin.take());
    assert!(b.child.wait().unwrap().success());
}

/// create (201/200/409, content type verbatim, TTL, expiry, closed with data), connect, head and delete report the specified fields.
#[test]
fn create_connect_head_delete() {
    let srv = server();
    let mut a = Adapter::start(&srv.base());
    let p = path("create");
    let r = a.send(json!({"type": "create", "path": p}));
    assert_eq!(ok(&r, "create")["status"], 201);
    assert!(r["offset"].is_string(), "{r}");
    assert_eq!(
        a.send(json!({"type": "create", "path": p}))["status"],
        200,
        "same configuration again"
    );
    err(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "CONFLICT",
        Some(409),
    );

    let h = a.send(json!({"type": "head", "path": p}));
    ok(&h, "head");
    assert_eq!(
        (
            h["status"].clone(),
            h["contentType"].clone(),
            h["streamClosed"].clone()
        ),
        (json!(200), json!("application/octet-stream"), json!(false))
    );
    assert!(
        h["offset"].as_str().is_some_and(|o| !o.is_empty()),
        "offset of an empty stream: {h}"
    );
    let c = a.send(json!({"type": "connect", "path": p}));
    assert_eq!(ok(&c, "connect")["status"], 200);
    assert_eq!(c["offset"], h["offset"]);

    let t = path("typed");
    ok(&a.send(json!({"type": "create", "path": t, "contentType": "text/plain; charset=utf-8", "ttlSeconds": 3600})), "create");
    let h = a.send(json!({"type": "head", "path": t}));
    assert_eq!(
        h["contentType"], "text/plain; charset=utf-8",
        "stored verbatim: {h}"
    );
    assert_eq!(h["ttlSeconds"], 3600, "{h}");
    let e = path("expiring");
    ok(
        &a.send(json!({"type": "create", "path": e, "expiresAt": "2099-01-01T00:00:00Z"})),
        "create",
    );
    assert!(a.send(json!({"type": "head", "path": e}))["expiresAt"]
        .as_str()
        .unwrap()
        .starts_with("2099-01-01"));
    err(
        &a.send(json!({"type": "create", "path": path("bad-expiry"), "expiresAt": "tomorrow"})),
        "INVALID_ARGUMENT",
        None,
    );

    let closed = path("closed");
    ok(&a.send(json!({"type": "create", "path": closed, "contentType": "text/plain", "closed": true, "data": "all there is"})), "create");
    assert_eq!(
        a.send(json!({"type": "head", "path": closed}))["streamClosed"],
        true
    );
    let r = a.send(json!({"type": "read", "path": closed}));
    assert_eq!(read_data(&r), "all there is");
    assert_eq!(r["streamClosed"], true);

    let missing = "/nonexistent-stream-12345";
    for ty in ["connect", "head", "delete"] {
        let r = a.send(json!({"type": ty, "path": missing}));
        err(&r, "NOT_FOUND", Some(404));
        assert!(
            r["message"].as_str().unwrap().contains(missing),
            "404 message names the path: {r}"
        );
    }
    assert_eq!(
        ok(&a.send(json!({"type": "delete", "path": p})), "delete")["status"],
        200
    );
    err(
        &a.send(json!({"type": "delete", "path": p})),
        "NOT_FOUND",
        Some(404),
    );
    err(
        &a.send(json!({"type": "head", "path": p})),
        "NOT_FOUND",
        Some(404),
    );
}

/// append reports 200 and the next offset for text, base64 and JSON bodies; Stream-Seq, closure, empty bodies and missing streams map to the specified errors.
#[test]
fn append_results_and_errors() {
    let srv = server();
    let mut a = Adapter::start(&srv.base());
    let p = path("append");
    ok(&a.send(json!({"type": "create", "path": p})), "create");
    let r1 = a.send(json!({"type": "append", "path": p, "data": "Hello ", "binary": false}));
    assert_eq!(ok(&r1, "append")["status"], 200);
    let b64 = base64::engine::general_purpose::STANDARD.encode("Binary!");
    let r2 = a.send(json!({"type": "append", "path": p, "data": b64, "binary": true}));
    assert_eq!(ok(&r2, "append")["status"], 200);
    assert_ne!(r1["offset"], r2["offset"]);
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": p}))),
        "Hello Binary!"
    );
    let r = a.send(json!({"type": "read", "path": p, "offset": r1["offset"]}));
    assert_eq!(
        read_data(&r),
        "Binary!",
        "reading from a stored append offset"
    );
    assert_eq!(r["offset"], r2["offset"]);
    err(
        &a.send(json!({"type": "append", "path": p, "data": "%%%", "binary": true})),
        "INVALID_ARGUMENT",
        None,
    );

    // Stream-Seq: values up to 2^53-1, compared by the server; a repeat conflicts.
    let s = path("seq");
    ok(
        &a.send(json!({"type": "create", "path": s, "contentType": "text/plain"})),
        "create",
    );
    ok(
        &a.send(json!({"type": "append", "path": s, "data": "a", "binary": false, "seq": 1})),
        "append",
    );
    ok(&a.send(json!({"type": "append", "path": s, "data": "b", "binary": false, "seq": 9007199254740991u64})), "append");
    err(&a.send(json!({"type": "append", "path": s, "data": "c", "binary": false, "seq": 9007199254740991u64})), "SEQUENCE_CONFLICT", Some(409));
    assert_eq!(read_data(&a.send(json!({"type": "read", "path": s}))), "ab");

    // An empty body is never a success.
    let r = a.send(json!({"type": "append", "path": s, "data": "", "binary": false}));
    assert_eq!(r["type"], "error", "{r}");
    assert!(r.get("status").map_or(true, |st| st == 400), "{r}");

    // JSON streams: data is one message; invalid JSON is the server's 400.
    let j = path("json");
    ok(
        &a.send(json!({"type": "create", "path": j, "contentType": "application/json"})),
        "create",
    );
    for d in [r#"{"message": "hello"}"#, "[1,2,3]", "42"] {
        ok(
            &a.send(json!({"type": "append", "path": j, "data": d, "binary": false})),
            "append",
        );
    }
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": j}))),
        r#"[{"message":"hello"},[1,2,3],42]"#
    );
    err(
        &a.send(json!({"type": "append", "path": j, "data": "{not json", "binary": false})),
        "UNEXPECTED_STATUS",
        Some(400),
    );

    let missing = "/missing-append-target";
    let r = a.send(json!({"type": "append", "path": missing, "data": "x", "binary": false}));
    err(&r, "NOT_FOUND", Some(404));
    assert!(r["message"].as_str().unwrap().contains(missing), "{r}");

    ok(&a.send(json!({"type": "close", "path": p})), "close");
    err(
        &a.send(json!({"type": "append", "path": p, "data": "late", "binary": false})),
        "STREAM_CLOSED",
        Some(409),
    );
}

/// Catch-up reads: text, ASCII in octet-streams as text, invalid UTF-8 as base64, compact JSON, offsets, maxChunks, characters split across responses, and read errors.
#[test]
fn catch_up_reads() {
    // Small server responses: a catch-up takes several requests.
    let srv = Server::start(&["--long-poll-timeout", "500ms", "--read-chunk-bytes", "4"]);
    let mut a = Adapter::start(&srv.base());
    let p = path("read");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    let empty = a.send(json!({"type": "read", "path": p}));
    assert_eq!(read_data(&empty), "");
    assert_eq!(
        (
            chunk_count(&empty),
            empty["upToDate"].clone(),
            empty["streamClosed"].clone(),
            empty["status"].clone()
        ),
        (0, json!(true), json!(false), json!(200))
    );

    let text = "héllo wörld, ünïcödé ✓";
    let appended = a.send(json!({"type": "append", "path": p, "data": text, "binary": false}));
    let r = a.send(json!({"type": "read", "path": p}));
    assert_eq!(
        read_data(&r),
        text,
        "characters split between responses are reassembled"
    );
    assert!(chunk_count(&r) > 1, "{r}");
    assert_eq!(
        (r["offset"].clone(), r["upToDate"].clone()),
        (appended["offset"].clone(), json!(true))
    );
    let limited = a.send(json!({"type": "read", "path": p, "maxChunks": 1}));
    assert_eq!(chunk_count(&limited), 1);
    assert_eq!(
        limited["upToDate"], false,
        "stopped before the tail: {limited}"
    );
    let rest = a.send(json!({"type": "read", "path": p, "offset": limited["offset"]}));
    assert_eq!(
        read_data(&limited) + &read_data(&rest),
        text,
        "resuming from the returned offset"
    );
    let huge_budget = a.send(json!({"type": "read", "path": p, "timeoutMs": u64::MAX}));
    assert_eq!(read_data(&huge_budget), text, "any timeoutMs is accepted");
    let now = a.send(json!({"type": "read", "path": p, "offset": "now"}));
    assert_eq!(
        (
            read_data(&now),
            now["offset"].clone(),
            now["upToDate"].clone()
        ),
        (String::new(), appended["offset"].clone(), json!(true))
    );

    let b = path("bytes");
    ok(&a.send(json!({"type": "create", "path": b})), "create");
    ok(
        &a.send(
            json!({"type": "append", "path": b, "data": "SGVsbG8gQmluYXJ5IQ==", "binary": true}),
        ),
        "append",
    );
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": b}))),
        "Hello Binary!",
        "octet-stream ASCII comes back as text"
    );
    let raw = path("raw");
    ok(&a.send(json!({"type": "create", "path": raw})), "create");
    ok(
        &a.send(json!({"type": "append", "path": raw, "data": "//79/A==", "binary": true})),
        "append",
    );
    let r = a.send(json!({"type": "read", "path": raw}));
    let chunk = &r["chunks"][0];
    assert_eq!(
        chunk["binary"], true,
        "invalid UTF-8 is reported as base64: {r}"
    );

    let j = path("json");
    ok(
        &a.send(json!({"type": "create", "path": j, "contentType": "application/json"})),
        "create",
    );
    ok(&a.send(json!({"type": "append", "path": j, "data": r#"{"z": 1, "a": [1, 2.50, "x y"]}"#, "binary": false})), "append");
    ok(
        &a.send(json!({"type": "append", "path": j, "data": r#"[4,5,6]"#, "binary": false})),
        "append",
    );
    let r = a.send(json!({"type": "read", "path": j}));
    let joined: String = read_data(&r);
    assert!(
        r["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| serde_json::from_str::<Vec<Value>>(c["data"].as_str().unwrap()).is_ok()),
        "every chunk is a JSON array: {r}"
    );
    assert!(
        joined.contains(r#"{"z":1,"a":[1,2.50,"x y"]}"#) && joined.contains("[4,5,6]"),
        "compact, key order and spelling kept: {joined}"
    );

    let bad = a.send(json!({"type": "read", "path": p, "offset": "not-a-valid-offset-format"}));
    err(&bad, "INVALID_OFFSET", Some(400));
    for live in [json!(false), json!("long-poll"), json!("sse"), json!(true)] {
        let r = a.send(
            json!({"type": "read", "path": "/no-such-stream", "live": live, "timeoutMs": 3000}),
        );
        err(&r, "NOT_FOUND", Some(404));
        assert!(
            r["message"].as_str().unwrap().contains("/no-such-stream"),
            "{r}"
        );
    }
}

/// Long-poll reads: 204 when nothing arrives after `now`, data appended during the read, waitForUpToDate, and closure ending the read.
#[test]
fn long_poll_reads() {
    let srv = server();
    let rt = rt();
    let mut a = Adapter::start(&srv.base());
    let p = path("lp");
    let created = a.send(json!({"type": "create", "path": p, "contentType": "text/plain"}));
    ok(
        &a.send(json!({"type": "append", "path": p, "data": "before", "binary": false})),
        "append",
    );
    let tail = a.send(json!({"type": "head", "path": p}))["offset"].clone();

    let r = a.send(
        json!({"type": "read", "path": p, "offset": "now", "live": "long-poll", "timeoutMs": 1000}),
    );
    assert_eq!(read_data(&r), "");
    assert_eq!(
        (
            r["status"].clone(),
            r["upToDate"].clone(),
            r["streamClosed"].clone(),
            r["offset"].clone()
        ),
        (json!(204), json!(true), json!(false), tail.clone())
    );

    let r = a.send(json!({"type": "read", "path": p, "offset": created["offset"], "live": "long-poll", "waitForUpToDate": true}));
    assert_eq!(
        (read_data(&r), r["upToDate"].clone(), r["status"].clone()),
        ("before".to_string(), json!(true), json!(200))
    );

    // A background read from the tail sees data appended while it waits.
    a.write(json!({"type": "read", "path": p, "offset": tail, "live": "long-poll", "maxChunks": 1, "timeoutMs": 10000}));
    let url = srv.url(&p[1..]);
    rt.block_on(async {
        DurableStream::new(&url)
            .unwrap()
            .append_text("during")
            .await
            .unwrap()
    });
    let r = a.recv();
    assert_eq!(read_data(&r), "during");
    assert_eq!(chunk_count(&r), 1);

    // Closing the stream ends a live read.
    let tail = a.send(json!({"type": "head", "path": p}))["offset"].clone();
    a.write(
        json!({"type": "read", "path": p, "offset": tail, "live": "long-poll", "timeoutMs": 10000}),
    );
    rt.block_on(async {
        DurableStream::new(&url)
            .unwrap()
            .close_with("end")
            .await
            .unwrap()
    });
    let r = a.recv();
    assert_eq!(
        (
            read_data(&r),
            r["streamClosed"].clone(),
            r["upToDate"].clone()
        ),
        ("end".to_string(), json!(true), json!(true))
    );
    let r = a.send(json!({"type": "read", "path": p, "live": "long-poll", "timeoutMs": 10000}));
    assert_eq!(
        (read_data(&r), r["streamClosed"].clone()),
        ("beforeduringend".to_string(), json!(true)),
        "a closed stream ends the read at once"
    );
}

/// SSE reads of text, binary (base64 on the wire) and JSON streams: catch-up, data during the read, waitForUpToDate, closure.
#[test]
fn sse_reads() {
    let srv = server();
    let rt = rt();
    let mut a = Adapter::start(&srv.base());
    for (ct, body, expected) in [
        (
            "text/plain",
            json!({"data": "sse text", "binary": false}),
            "sse text",
        ),
        (
            "application/octet-stream",
            json!({"data": "AAEC/w==", "binary": true}),
            "",
        ),
        (
            "application/json",
            json!({"data": r#"{"k": "v"}"#, "binary": false}),
            r#"[{"k":"v"}]"#,
        ),
    ] {
        let p = path("sse");
        ok(
            &a.send(json!({"type": "create", "path": p, "contentType": ct})),
            "create",
        );
        let mut cmd = json!({"type": "append", "path": p});
        cmd.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let appended = a.send(cmd);
        let r = a.send(json!({"type": "read", "path": p, "live": "sse", "waitForUpToDate": true}));
        if ct == "application/octet-stream" {
            let chunk = &r["chunks"][0];
            assert_eq!(chunk["binary"], true, "{r}");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(chunk["data"].as_str().unwrap())
                .unwrap();
            assert_eq!(
                bytes,
                vec![0, 1, 2, 255],
                "SSE base64 payload decoded by the client"
            );
        } else {
            assert_eq!(read_data(&r), expected, "{ct}");
        }
        assert_eq!(
            (
                r["upToDate"].clone(),
                r["offset"].clone(),
                r["streamClosed"].clone()
            ),
            (json!(true), appended["offset"].clone(), json!(false))
        );

        // Data appended during the read, then closure.
        a.write(json!({"type": "read", "path": p, "offset": appended["offset"], "live": "sse", "maxChunks": 1, "timeoutMs": 10000}));
        let url = srv.url(&p[1..]);
        rt.block_on(async {
            DurableStream::new(&url)
                .unwrap()
                .append_text(if ct == "application/json" {
                    "7"
                } else {
                    "more"
                })
                .await
                .unwrap()
        });
        let r = a.recv();
        assert_eq!(
            read_data(&r),
            if ct == "application/json" {
                "[7]"
            } else {
                "more"
            }
        );
        a.write(json!({"type": "read", "path": p, "offset": r["offset"], "live": "sse", "timeoutMs": 10000}));
        rt.block_on(async { DurableStream::new(&url).unwrap().close().await.unwrap() });
        let r = a.recv();
        assert_eq!(
            (chunk_count(&r), r["streamClosed"].clone()),
            (0, json!(true)),
            "{r}"
        );
    }
    let p = path("sse-now");
    ok(&a.send(json!({"type": "create", "path": p})), "create");
    let r = a
        .send(json!({"type": "read", "path": p, "offset": "now", "live": "sse", "timeoutMs": 800}));
    assert_eq!(
        (
            chunk_count(&r),
            r["upToDate"].clone(),
            r["streamClosed"].clone()
        ),
        (0, json!(true), json!(false))
    );
}

/// `live: true` (auto): catch-up then follow, with data appended during the read.
#[test]
fn auto_reads() {
    let srv = server();
    let rt = rt();
    let mut a = Adapter::start(&srv.base());
    let p = path("auto");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    let first = a.send(json!({"type": "append", "path": p, "data": "one ", "binary": false}));
    let r = a.send(json!({"type": "read", "path": p, "live": true, "waitForUpToDate": true}));
    assert_eq!(
        (read_data(&r), r["upToDate"].clone()),
        ("one ".to_string(), json!(true))
    );
    a.write(json!({"type": "read", "path": p, "offset": first["offset"], "live": true, "maxChunks": 1, "timeoutMs": 10000}));
    let url = srv.url(&p[1..]);
    rt.block_on(async {
        DurableStream::new(&url)
            .unwrap()
            .append_text("two")
            .await
            .unwrap()
    });
    assert_eq!(read_data(&a.recv()), "two");
}

/// close returns the final offset, is idempotent without data, appends a final message atomically, and maps a closed or missing stream.
#[test]
fn close_command() {
    let srv = server();
    let mut a = Adapter::start(&srv.base());
    let p = path("close");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    ok(
        &a.send(json!({"type": "append", "path": p, "data": "body", "binary": false})),
        "append",
    );
    let c = a.send(json!({"type": "close", "path": p}));
    let final_offset = ok(&c, "close")["finalOffset"].clone();
    assert!(c.get("status").map_or(true, |s| s == 200), "{c}");
    assert_eq!(
        a.send(json!({"type": "head", "path": p}))["offset"],
        final_offset
    );
    assert_eq!(
        ok(&a.send(json!({"type": "close", "path": p})), "close")["finalOffset"],
        final_offset,
        "closing again succeeds"
    );
    err(
        &a.send(json!({"type": "close", "path": p, "data": "more"})),
        "STREAM_CLOSED",
        Some(409),
    );

    let j = path("close-json");
    ok(
        &a.send(json!({"type": "create", "path": j, "contentType": "application/json"})),
        "create",
    );
    let c = a.send(json!({"type": "close", "path": j, "data": "[\"last\"]"}));
    ok(&c, "close");
    let r = a.send(json!({"type": "read", "path": j}));
    assert_eq!(
        (
            read_data(&r),
            r["streamClosed"].clone(),
            r["offset"].clone()
        ),
        (
            r#"[["last"]]"#.to_string(),
            json!(true),
            c["finalOffset"].clone()
        ),
        "the final message is one JSON message"
    );
    err(
        &a.send(json!({"type": "close", "path": "/no-such-stream"})),
        "NOT_FOUND",
        Some(404),
    );
}

/// The idempotent producer commands: cached producers continue sequence numbers, batches deduplicate, pipelining completes, close is idempotent, detach keeps the stream open, auto-claim absorbs a 403.
#[test]
fn idempotent_producer_commands() {
    let srv = server();
    let rt = rt();
    let mut a = Adapter::start(&srv.base());
    let p = path("producer");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    let base = json!({"path": p, "producerId": "producer-1", "epoch": 0, "autoClaim": false});
    let with = |ty: &str, extra: Value| {
        let mut c = base.clone();
        c["type"] = json!(ty);
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let r = a.send(with("idempotent-append", json!({"data": "a"})));
    assert_eq!(
        (
            ok(&r, "idempotent-append")["status"].clone(),
            r["duplicate"].clone(),
            r["producerSeq"].clone()
        ),
        (json!(200), json!(false), json!(0))
    );
    assert!(r["offset"].is_string(), "{r}");
    let r = a.send(with("idempotent-append", json!({"data": "b"})));
    assert_eq!(
        r["producerSeq"], 1,
        "the cached producer continues its sequence: {r}"
    );
    let c = a.send(with("idempotent-close", json!({"data": "body-A"})));
    assert_eq!(ok(&c, "idempotent-close")["status"], 200);
    let final_offset = c["finalOffset"].clone();
    let again = a.send(with("idempotent-close", json!({"data": "body-B"})));
    assert_eq!(
        ok(&again, "idempotent-close")["finalOffset"],
        final_offset,
        "a repeated close returns the first result"
    );
    let r = a.send(json!({"type": "read", "path": p}));
    assert_eq!(
        (read_data(&r), r["streamClosed"].clone()),
        ("abbody-A".to_string(), json!(true))
    );
    // Another producer's final message cannot land on a closed stream. (A
    // close-only request from it is accepted by this server as a no-op.)
    let other = a.send(json!({"type": "idempotent-close", "path": p, "producerId": "producer-2", "epoch": 0, "autoClaim": false, "data": "body-C"}));
    err(&other, "STREAM_CLOSED", Some(409));

    // append-batch: one batch with maxInFlight 1, so a repeat is a duplicate.
    let j = path("batch");
    ok(
        &a.send(json!({"type": "create", "path": j, "contentType": "application/json"})),
        "create",
    );
    let batch = json!({"type": "idempotent-append-batch", "path": j, "producerId": "batcher", "epoch": 0, "autoClaim": false, "items": ["{\"n\":1}", "[2,3]"], "maxInFlight": 1});
    let r = a.send(batch.clone());
    assert_eq!(
        (
            ok(&r, "idempotent-append-batch")["status"].clone(),
            r["producerSeq"].clone()
        ),
        (json!(200), json!(0))
    );
    ok(&a.send(batch), "idempotent-append-batch");
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": j}))),
        r#"[{"n":1},[2,3]]"#,
        "the repeated batch was deduplicated"
    );
    // Pipelined: every item arrives.
    let items: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let r = a.send(json!({"type": "idempotent-append-batch", "path": j, "producerId": "pipeliner", "epoch": 0, "autoClaim": false, "items": items, "maxInFlight": 5}));
    ok(&r, "idempotent-append-batch");
    let all: Vec<Value> =
        serde_json::from_str(&read_data(&a.send(json!({"type": "read", "path": j})))).unwrap();
    let mut numbers: Vec<i64> = all.iter().filter_map(Value::as_i64).collect();
    numbers.sort();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());

    // detach stops the producer without closing the stream.
    let d = path("detach");
    ok(
        &a.send(json!({"type": "create", "path": d, "contentType": "text/plain"})),
        "create",
    );
    ok(&a.send(json!({"type": "idempotent-append", "path": d, "producerId": "p", "epoch": 0, "autoClaim": false, "data": "x"})), "idempotent-append");
    let r = a.send(json!({"type": "idempotent-detach", "path": d, "producerId": "p", "epoch": 0}));
    assert_eq!(ok(&r, "idempotent-detach")["status"], 200);
    ok(
        &a.send(json!({"type": "append", "path": d, "data": "y", "binary": false})),
        "append",
    );
    assert_eq!(read_data(&a.send(json!({"type": "read", "path": d}))), "xy");
    ok(
        &a.send(
            json!({"type": "idempotent-detach", "path": d, "producerId": "never-used", "epoch": 0}),
        ),
        "idempotent-detach",
    );

    // Epoch 5 exists on the server: epoch 0 fails without auto-claim and succeeds with it.
    let e = path("claim");
    ok(
        &a.send(json!({"type": "create", "path": e, "contentType": "text/plain"})),
        "create",
    );
    let url = srv.url(&e[1..]);
    rt.block_on(async {
        let s = DurableStream::new(&url).unwrap();
        let p5 = s
            .producer(
                "claimed",
                ProducerOptions {
                    epoch: 5,
                    ..ProducerOptions::default()
                },
            )
            .unwrap();
        p5.send("epoch5 ").await.unwrap();
        p5.detach().await.unwrap();
    });
    let r = a.send(json!({"type": "idempotent-append", "path": e, "producerId": "claimed", "epoch": 0, "autoClaim": false, "data": "stale"}));
    err(&r, "UNEXPECTED_STATUS", Some(403));
    let r = a.send(json!({"type": "idempotent-append", "path": e, "producerId": "claimed", "epoch": 1, "autoClaim": true, "data": "claimed"}));
    ok(&r, "idempotent-append");
    assert_eq!(r["producerEpoch"], 6, "{r}");
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": e}))),
        "epoch5 claimed"
    );
    let missing = a.send(json!({"type": "idempotent-append", "path": "/no-such-stream", "producerId": "p", "epoch": 0, "autoClaim": false, "data": "x"}));
    err(&missing, "NOT_FOUND", Some(404));
}

/// A proxy in front of the server that logs every request and can answer
/// the next requests with `503 Retry-After: 0`. It parses request
/// boundaries, so failures are injected on reused keep-alive connections too.
struct FaultProxy {
    addr: SocketAddr,
    fail: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<u8>>>,
}

impl FaultProxy {
    fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FaultProxy {
            addr: listener.local_addr().unwrap(),
            fail: Arc::default(),
            log: Arc::default(),
        };
        let (fail, log) = (proxy.fail.clone(), proxy.log.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (fail, log) = (fail.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = FaultProxy::serve(client, upstream, &fail, &log);
                });
            }
        });
        proxy
    }

    fn serve(
        mut client: TcpStream,
        upstream: SocketAddr,
        fail: &AtomicUsize,
        log: &Mutex<Vec<u8>>,
    ) -> std::io::Result<()> {
        let mut up = TcpStream::connect(upstream)?;
        let (mut up_r, mut client_w) = (up.try_clone()?, client.try_clone()?);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_r, &mut client_w);
            let _ = client_w.shutdown(Shutdown::Both);
        });
        let mut reader = BufReader::new(client.try_clone()?);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    let _ = up.shutdown(Shutdown::Both);
                    return Ok(());
                }
                head.extend_from_slice(&line);
                if line == b"\r\n" {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&head).to_lowercase();
            let len = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body)?;
            log.lock().unwrap().extend_from_slice(&head);
            if fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                // HTTP/1.1 clients do not pipeline: the previous response is complete.
                client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
                let _ = client.shutdown(Shutdown::Both);
                let _ = up.shutdown(Shutdown::Both);
                return Ok(());
            }
            up.write_all(&head)?;
            up.write_all(&body)?;
        }
    }

    fn fail_next(&self, n: usize) {
        self.fail.store(n, Ordering::SeqCst);
    }
    fn failures_left(&self) -> usize {
        self.fail.load(Ordering::SeqCst)
    }
    /// Every request head so far, lowercased.
    fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).to_lowercase()
    }
}

/// Dynamic headers and params: evaluated once per append/read, reported in headersSent/paramsSent, sent on the wire, reset when set again, and cleared.
#[test]
fn dynamic_headers_and_params() {
    let srv = server();
    let proxy = FaultProxy::start(srv.addr);
    let mut a = Adapter::start(&format!("http://{}/v1/stream", proxy.addr));
    let p = path("dyn");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    assert!(
        a.send(json!({"type": "append", "path": p, "data": "0", "binary": false}))
            .get("headersSent")
            .is_none(),
        "nothing configured"
    );
    ok(&a.send(json!({"type": "set-dynamic-header", "name": "X-Request-Counter", "valueType": "counter"})), "set-dynamic-header");
    ok(&a.send(json!({"type": "set-dynamic-header", "name": "Authorization", "valueType": "token", "initialValue": "Bearer token-v1"})), "set-dynamic-header");
    ok(
        &a.send(json!({"type": "set-dynamic-header", "name": "X-Time", "valueType": "timestamp"})),
        "set-dynamic-header",
    );
    ok(
        &a.send(json!({"type": "set-dynamic-param", "name": "request_id", "valueType": "counter"})),
        "set-dynamic-param",
    );
    for i in 1..=3 {
        let r =
            a.send(json!({"type": "append", "path": p, "data": i.to_string(), "binary": false}));
        ok(&r, "append");
        assert_eq!(r["headersSent"]["X-Request-Counter"], i.to_string(), "{r}");
        assert_eq!(r["headersSent"]["Authorization"], "Bearer token-v1");
        assert!(
            r["headersSent"]["X-Time"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 1_600_000_000_000
        );
        assert_eq!(r["paramsSent"]["request_id"], i.to_string());
        // Other commands do not advance the counters.
        ok(&a.send(json!({"type": "head", "path": p})), "head");
    }
    let r = a.send(json!({"type": "read", "path": p}));
    assert_eq!(read_data(&r), "0123");
    assert_eq!(
        (
            r["headersSent"]["X-Request-Counter"].clone(),
            r["paramsSent"]["request_id"].clone()
        ),
        (json!("4"), json!("4"))
    );
    let log = proxy.log_text();
    for i in 1..=4 {
        assert!(
            log.contains(&format!("x-request-counter: {i}\r\n")),
            "header {i} on the wire"
        );
        assert!(
            log.contains(&format!("request_id={i} ")),
            "param {i} in the URL"
        );
    }
    assert!(log.contains("authorization: bearer token-v1\r\n"));

    // Setting a name again replaces it and restarts its counter; a token can be replaced.
    ok(&a.send(json!({"type": "set-dynamic-header", "name": "X-Request-Counter", "valueType": "counter"})), "set-dynamic-header");
    ok(&a.send(json!({"type": "set-dynamic-header", "name": "Authorization", "valueType": "token", "initialValue": "Bearer token-v2"})), "set-dynamic-header");
    let r = a.send(json!({"type": "append", "path": p, "data": "5", "binary": false}));
    assert_eq!(
        (
            r["headersSent"]["X-Request-Counter"].clone(),
            r["headersSent"]["Authorization"].clone()
        ),
        (json!("1"), json!("Bearer token-v2"))
    );
    assert_eq!(
        r["paramsSent"]["request_id"], "5",
        "the param counter was not reset"
    );
    assert!(proxy
        .log_text()
        .contains("authorization: bearer token-v2\r\n"));
    // A command header wins over a dynamic one of the same name.
    let r = a.send(json!({"type": "append", "path": p, "data": "6", "binary": false, "headers": {"authorization": "Bearer explicit"}}));
    ok(&r, "append");
    assert!(proxy
        .log_text()
        .contains("authorization: bearer explicit\r\n"));

    ok(&a.send(json!({"type": "clear-dynamic"})), "clear-dynamic");
    let r = a.send(json!({"type": "append", "path": p, "data": "7", "binary": false}));
    assert!(
        r.get("headersSent").is_none() && r.get("paramsSent").is_none(),
        "{r}"
    );
    err(
        &a.send(json!({"type": "set-dynamic-header", "name": "X", "valueType": "dice"})),
        "INVALID_ARGUMENT",
        None,
    );
}

/// Transient failures (503s) are retried for appends and reads, and a storm of them still gets a bounded error reply.
#[test]
fn transient_failures_are_retried() {
    let srv = server();
    let proxy = FaultProxy::start(srv.addr);
    let mut a = Adapter::start(&format!("http://{}/v1/stream", proxy.addr));
    let p = path("flaky");
    ok(
        &a.send(json!({"type": "create", "path": p, "contentType": "text/plain"})),
        "create",
    );
    proxy.fail_next(2);
    ok(
        &a.send(json!({"type": "append", "path": p, "data": "once", "binary": false})),
        "append",
    );
    assert_eq!(proxy.failures_left(), 0, "the append met both failures");
    proxy.fail_next(2);
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": p}))),
        "once",
        "the append landed exactly once; the read was retried"
    );
    assert_eq!(proxy.failures_left(), 0);
    proxy.fail_next(3);
    ok(&a.send(json!({"type": "idempotent-append", "path": p, "producerId": "p", "epoch": 0, "autoClaim": false, "data": "!"})), "idempotent-append");
    assert_eq!(proxy.failures_left(), 0);
    proxy.fail_next(1000);
    err(
        &a.send(json!({"type": "append", "path": p, "data": "never", "binary": false})),
        "UNEXPECTED_STATUS",
        Some(503),
    );
    assert!(proxy.failures_left() < 1000);
    proxy.fail_next(0);
    assert_eq!(
        read_data(&a.send(json!({"type": "read", "path": p}))),
        "once!"
    );
}

/// validate: retry options and producer options are accepted or rejected with INVALID_ARGUMENT naming the parameter.
#[test]
fn validate_targets() {
    let srv = server();
    let mut a = Adapter::start(&srv.base());
    let mut check = |target: Value, bad: Option<&str>| {
        let r = a.send(json!({"type": "validate", "target": target}));
        match bad {
            None => assert_eq!(r, json!({"type": "validate", "success": true}), "{target}"),
            Some(param) => {
                err(&r, "INVALID_ARGUMENT", None);
                assert!(
                    r["message"].as_str().unwrap().contains(param),
                    "{target}: {r}"
                );
            }
        }
    };
    check(json!({"target": "retry-options"}), None);
    check(
        json!({"target": "retry-options", "maxRetries": 3, "initialDelayMs": 100, "maxDelayMs": 1000, "multiplier": 2}),
        None,
    );
    check(json!({"target": "retry-options", "maxRetries": 0}), None);
    check(
        json!({"target": "retry-options", "maxRetries": -1}),
        Some("maxRetries"),
    );
    check(
        json!({"target": "retry-options", "initialDelayMs": 0}),
        Some("initialDelayMs"),
    );
    check(
        json!({"target": "retry-options", "initialDelayMs": -5}),
        Some("initialDelayMs"),
    );
    check(
        json!({"target": "retry-options", "initialDelayMs": 1000, "maxDelayMs": 100}),
        Some("maxDelayMs"),
    );
    check(
        json!({"target": "retry-options", "multiplier": 0.5}),
        Some("multiplier"),
    );
    check(json!({"target": "retry-options", "multiplier": 1.5}), None);
    check(
        json!({"target": "retry-options", "initialDelayMs": 1e300, "maxDelayMs": 1e301}),
        Some("initialDelayMs"),
    );
    check(
        json!({"target": "retry-options", "maxRetries": 2.5}),
        Some("maxRetries"),
    );
    check(
        json!({"target": "idempotent-producer", "producerId": "test-producer", "epoch": 0, "maxBatchBytes": 1024, "maxBatchItems": 10}),
        None,
    );
    check(json!({"target": "idempotent-producer"}), None);
    check(
        json!({"target": "idempotent-producer", "producerId": "test-producer", "epoch": -1}),
        Some("epoch"),
    );
    check(
        json!({"target": "idempotent-producer", "maxBatchBytes": -1}),
        Some("maxBatchBytes"),
    );
    check(
        json!({"target": "idempotent-producer", "maxBatchBytes": 0}),
        Some("maxBatchBytes"),
    );
    check(
        json!({"target": "idempotent-producer", "maxBatchItems": 0}),
        Some("maxBatchItems"),
    );
    check(
        json!({"target": "idempotent-producer", "maxBatchItems": -3}),
        Some("maxBatchItems"),
    );
    check(
        json!({"target": "idempotent-producer", "producerId": ""}),
        Some("producerId"),
    );
    let r = a.send(json!({"type": "validate", "target": {"target": "flux-capacitor"}}));
    err(&r, "NOT_SUPPORTED", None);
}

#[track_caller]
fn bench_op(a: &mut Adapter, id: &str, op: Value) -> Value {
    let r = a.send(json!({"type": "benchmark", "iterationId": id, "operation": op}));
    ok(&r, "benchmark");
    assert_eq!(r["iterationId"], id);
    assert!(
        r["durationNs"].as_str().unwrap().parse::<u128>().is_ok(),
        "{r}"
    );
    r
}

/// benchmark: every operation echoes the iteration id, reports a duration in nanoseconds and its metrics, and really does the work.
#[test]
fn benchmark_operations() {
    let srv = server();
    let mut a = Adapter::start(&srv.base());
    let p = path("bench");
    bench_op(&mut a, "measure-0", json!({"op": "create", "path": p}));
    let r = bench_op(
        &mut a,
        "measure-1",
        json!({"op": "append", "path": p, "size": 1024}),
    );
    assert_eq!(r["metrics"]["bytesTransferred"], 1024);
    let r = bench_op(&mut a, "measure-2", json!({"op": "read", "path": p}));
    assert_eq!(r["metrics"]["bytesTransferred"], 1024);
    for (i, (live, ct)) in [
        ("long-poll", "application/octet-stream"),
        ("sse", "application/json"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = bench_op(
            &mut a,
            &format!("warmup-{i}"),
            json!({"op": "roundtrip", "path": path("rt"), "size": 100, "live": live, "contentType": ct}),
        );
        assert!(
            r["metrics"]["bytesTransferred"].as_u64().unwrap() >= 100,
            "{r}"
        );
    }
    let t = path("throughput");
    for i in 0..2 {
        let r = bench_op(
            &mut a,
            &format!("measure-t{i}"),
            json!({"op": "throughput_append", "path": t, "count": 500, "size": 10, "concurrency": 4}),
        );
        assert_eq!(r["metrics"]["messagesProcessed"], 500);
        assert_eq!(r["metrics"]["bytesTransferred"], 5000);
    }
    let r = a.send(json!({"type": "read", "path": t}));
    assert_eq!(
        read_data(&r).len(),
        10_000,
        "both iterations were stored, not deduplicated"
    );
    let j = path("json-read");
    ok(
        &a.send(json!({"type": "create", "path": j, "contentType": "application/json"})),
        "create",
    );
    let items: Vec<String> = (0..50).map(|i| format!("{{\"i\":{i}}}")).collect();
    ok(&a.send(json!({"type": "idempotent-append-batch", "path": j, "producerId": "fill", "epoch": 0, "autoClaim": false, "items": items})), "idempotent-append-batch");
    let r = bench_op(
        &mut a,
        "measure-r",
        json!({"op": "throughput_read", "path": j, "expectedCount": 100000}),
    );
    assert_eq!(r["metrics"]["messagesProcessed"], 50);
    let r = a.send(
        json!({"type": "benchmark", "iterationId": "x", "operation": {"op": "warp", "path": p}}),
    );
    err(&r, "NOT_SUPPORTED", None);
}

/// A tiny fake server answering with canned (malformed) responses, for the parse errors a real server never produces.
fn fake_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                let is_head = line.starts_with("HEAD");
                let sse = line.contains("live=sse");
                let (ct, body) = if line.contains("/bad-json") {
                    ("application/json", "[{\"a\":")
                } else if line.contains("/bad-control") {
                    (
                        "text/plain",
                        "event: data\ndata: hello\n\nevent: control\ndata: {bad\n\n",
                    )
                } else if line.contains("/empty-control") {
                    (
                        "text/plain",
                        "event: data\ndata: hello\n\nevent: control\ndata:\n\n",
                    )
                } else {
                    ("text/plain", "event: mystery\ndata: ignore me\n\nevent: data\ndata: hi\n\nevent: control\ndata: {\"streamNextOffset\":\"0_2\",\"upToDate\":true}\n\n")
                };
                let response = if is_head {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\nstream-next-offset: 0_0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                } else if sse {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}")
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\nstream-next-offset: 0_9\r\nstream-up-to-date: true\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = conn.write_all(response.as_bytes());
            });
        }
    });
    format!("http://{addr}")
}

/// Malformed responses become PARSE_ERROR without a status: a truncated JSON body, an invalid or empty SSE control event; unknown SSE events are skipped.
#[test]
fn parse_errors_from_malformed_responses() {
    let mut a = Adapter::start(&fake_server());
    err(
        &a.send(json!({"type": "read", "path": "/bad-json"})),
        "PARSE_ERROR",
        None,
    );
    err(
        &a.send(json!({"type": "read", "path": "/bad-control", "live": "sse", "timeoutMs": 3000})),
        "PARSE_ERROR",
        None,
    );
    err(
        &a.send(
            json!({"type": "read", "path": "/empty-control", "live": "sse", "timeoutMs": 3000}),
        ),
        "PARSE_ERROR",
        None,
    );
    let r = a.send(json!({"type": "read", "path": "/fine", "live": "sse", "waitForUpToDate": true, "timeoutMs": 3000}));
    assert_eq!(
        (read_data(&r), r["offset"].clone(), r["upToDate"].clone()),
        ("hi".to_string(), json!("0_2"), json!(true))
    );
}

/// Streams created by others are learnt on first use: a read or append on a JSON stream the adapter never created still handles JSON.
#[test]
fn content_type_learnt_from_the_server() {
    let srv = server();
    let rt = rt();
    let p = path("foreign");
    let url = srv.url(&p[1..]);
    rt.block_on(async {
        DurableStream::create(&url, CreateOptions::new().json())
            .await
            .unwrap()
    });
    let mut a = Adapter::start(&srv.base());
    ok(
        &a.send(json!({"type": "append", "path": p, "data": "[1, 2]", "binary": false})),
        "append",
    );
    assert_eq!(
        read_data(
            &a.send(json!({"type": "read", "path": p, "live": "sse", "waitForUpToDate": true}))
        ),
        "[[1,2]]"
    );
    let items: Vec<Value> = rt.block_on(async {
        DurableStream::new(&url)
            .unwrap()
            .stream(StreamOptions::new())
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        items,
        vec![json!([1, 2])],
        "one message, as the reference client stores it"
    );
}
