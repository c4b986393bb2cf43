//! The configuration file and its merging with environment variables and
//! flags, tested through the real binary: `config check` output, refused
//! files (unknown keys, bad values, each naming key and line), and a running
//! server configured from a file, the environment and flags together.

#![allow(clippy::unwrap_used)]

mod served;
mod support;

use served::{run_once, Served, TempDir};

/// Parses `config check` output (which must be valid TOML).
fn effective(stdout: &str) -> toml::Table {
    stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("config check printed invalid TOML ({e}):\n{stdout}"))
}

fn get<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    t.get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("no {section}.{key} in {t:#?}"))
}

/// `config check` exits 0 and prints valid TOML holding the file's values
/// and the defaults of everything the file leaves out.
#[test]
fn check_prints_effective_configuration_as_toml() {
    let dir = TempDir::new("cfg");
    let file = dir.write(
        "c.toml",
        "[server]\nlisten = [\"0.0.0.0:8080\", \"[::1]:8081\"]\npath_prefix = \"/streams\"\n\
         [timeouts]\nlong_poll = \"5s\"\nproducer_reorder_wait = \"250ms\"\n\
         [limits]\nmax_connections = 123\n[logging]\nformat = \"json\"\n",
    );
    let out = run_once(&["config", "check", &file], &[]);
    assert!(out.status.unwrap().success(), "{out:?}");
    let t = effective(&out.stdout);
    assert_eq!(
        get(&t, "server", "listen").as_array().unwrap().len(),
        2,
        "{}",
        out.stdout
    );
    assert_eq!(get(&t, "server", "path_prefix").as_str(), Some("/streams"));
    assert_eq!(get(&t, "timeouts", "long_poll").as_str(), Some("5s"));
    assert_eq!(
        get(&t, "timeouts", "producer_reorder_wait").as_str(),
        Some("250ms")
    );
    assert_eq!(get(&t, "limits", "max_connections").as_integer(), Some(123));
    assert_eq!(get(&t, "logging", "format").as_str(), Some("json"));
    // Defaults fill the rest.
    assert_eq!(
        get(&t, "limits", "read_chunk_bytes").as_integer(),
        Some(1024 * 1024)
    );
    assert_eq!(
        get(&t, "timeouts", "sse_reconnect_interval").as_str(),
        Some("1m")
    );
    for section in ["auth", "compression", "rate_limit", "cors", "tls"] {
        assert!(t.contains_key(section), "no [{section}] in\n{}", out.stdout);
    }
}

/// A flag beats its `DS_*` variable, which beats the file, which beats the
/// default; --host/--port edit only the first listen address.
#[test]
fn flags_beat_environment_beat_file_beat_defaults() {
    let dir = TempDir::new("cfg");
    let file = dir.write(
        "c.toml",
        "[server]\nlisten = [\"10.0.0.1:1000\", \"10.0.0.2:2000\"]\npath_prefix = \"/file\"\n\
         [timeouts]\nlong_poll = \"7s\"\ncursor_interval = \"9s\"\n\
         [limits]\nmax_connections = 11\nmax_live_readers = 12\n",
    );
    let out = run_once(
        &[
            "config",
            "check",
            &file,
            "--path-prefix",
            "/flag",
            "--port",
            "3000",
        ],
        &[
            ("DS_PATH_PREFIX", "/env"),
            ("DS_LONG_POLL_TIMEOUT", "8s"),
            ("DS_MAX_CONNECTIONS", "13"),
            ("DS_HOST", "10.0.0.9"),
        ],
    );
    assert!(out.status.unwrap().success(), "{out:?}");
    let t = effective(&out.stdout);
    // flag over env over file
    assert_eq!(get(&t, "server", "path_prefix").as_str(), Some("/flag"));
    // env over file
    assert_eq!(get(&t, "timeouts", "long_poll").as_str(), Some("8s"));
    assert_eq!(get(&t, "limits", "max_connections").as_integer(), Some(13));
    // file over default
    assert_eq!(get(&t, "timeouts", "cursor_interval").as_str(), Some("9s"));
    assert_eq!(get(&t, "limits", "max_live_readers").as_integer(), Some(12));
    // default
    assert_eq!(
        get(&t, "limits", "max_live_readers_per_stream").as_integer(),
        Some(10_000)
    );
    let listen: Vec<&str> = get(&t, "server", "listen")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listen, ["10.0.0.9:3000", "10.0.0.2:2000"]);
}

/// An unknown key is refused, by `config check` and by `run`, with an
/// error naming the key and its line; the server does not start.
#[test]
fn unknown_key_is_refused_naming_key_and_line() {
    let dir = TempDir::new("cfg");
    let data = dir.0.join("data");
    let file = dir.write(
        "c.toml",
        "[server]\npath_prefix = \"/v1/stream\"\n\n[limits]\nmax_conections = 5\n",
    );
    let out = run_once(&["config", "check", &file], &[]);
    assert_eq!(out.status.unwrap().code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains("limits.max_conections") && out.stderr.contains("line 5"),
        "{}",
        out.stderr
    );
    let out = run_once(
        &[
            "run",
            "--config",
            &file,
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    let status = out.status.expect("`run` with a bad config kept running");
    assert!(!status.success(), "{out:?}");
    assert!(out.stderr.contains("max_conections"), "{}", out.stderr);
    let out = run_once(
        &["config", "check", &dir.write("d.toml", "[metric]\n")],
        &[],
    );
    assert!(
        out.stderr.contains("`metric`") && out.stderr.contains("line 1"),
        "{}",
        out.stderr
    );
}

/// Bad values are errors naming the key and the line: a type error, a bad
/// duration, a semantic error (path prefix), a TLS cert without its key, an
/// unreadable certificate file.
#[test]
fn bad_values_name_key_and_line() {
    let dir = TempDir::new("cfg");
    let cases = [
        (
            "[limits]\n\nread_chunk_bytes = \"big\"\n",
            "limits.read_chunk_bytes",
            "line 3",
        ),
        (
            "[timeouts]\nlong_poll = \"forever\"\n",
            "timeouts.long_poll",
            "line 2",
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:0\"]\npath_prefix = \"v1\"\n",
            "server.path_prefix",
            "line 3",
        ),
        ("[tls]\ncert = \"/x.pem\"\n", "tls.key", ""),
        (
            "[tls]\n\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            "tls.cert",
            "line 3",
        ),
        ("[logging]\nformat = \"xml\"\n", "logging.format", "line 2"),
        (
            "[limits]\nmax_connections = 0\n",
            "limits.max_connections",
            "line 2",
        ),
    ];
    for (i, (text, key, line)) in cases.iter().enumerate() {
        let file = dir.write(&format!("c{i}.toml"), text);
        let out = run_once(&["config", "check", &file], &[]);
        assert_eq!(out.status.unwrap().code(), Some(1), "{text}: {out:?}");
        assert!(
            out.stderr.contains(&format!("`{key}`")) && out.stderr.contains(line),
            "{text}: expected key {key} and {line:?} in: {}",
            out.stderr
        );
    }
    // A bad value overridden by a valid flag is no longer an error.
    let file = dir.write("ok.toml", "[server]\npath_prefix = \"v1\"\n");
    let out = run_once(&["config", "check", &file, "--path-prefix", "/v1"], &[]);
    assert!(out.status.unwrap().success(), "{out:?}");
}

/// A server started from a file listens where the file says unless --port
/// overrides it, and serves streams under the prefix of `DS_PATH_PREFIX`
/// (environment over file), not the file's.
#[tokio::test]
async fn running_server_uses_file_environment_and_flags() {
    let dir = TempDir::new("cfg");
    let file = dir.write(
        "c.toml",
        "[server]\nlisten = [\"127.0.0.1:1\"]\npath_prefix = \"/file\"\n\
         [timeouts]\nlong_poll = \"1s\"\n",
    );
    let srv = Served::start(
        &["dev", "--config", &file, "--port", "0"],
        &[("DS_PATH_PREFIX", "/env")],
        1,
    );
    let base = format!("http://{}", srv.addr(false));
    let c = reqwest::Client::new();
    let r = c
        .put(format!("{base}/env/s"))
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .put(format!("{base}/file/s"))
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The file's 1 s long-poll timeout applies: an idle long-poll answers 204.
    let r = c
        .get(format!("{base}/env/s?offset=now&live=long-poll"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

/// `--log-format json` makes every log line a JSON object; the listening
/// line carries the address as a field.
#[test]
fn json_log_format_writes_json_lines() {
    let out = {
        let srv = Served::start(&["dev", "--port", "0", "--log-format", "json"], &[], 0);
        assert!(srv.wait_for_log("listening"), "{}", srv.log());
        srv.log()
    };
    let mut saw_listening = false;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        if v["message"]
            .as_str()
            .is_some_and(|m| m.contains("listening"))
        {
            assert!(
                v["addr"]
                    .as_str()
                    .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok()),
                "{line}"
            );
            saw_listening = true;
        }
    }
    assert!(saw_listening, "{out}");
}

/// With `public_url` set, URLs the server hands out (a webhook
/// subscription's JWKS URL) use it instead of `http://<Host>`.
#[tokio::test]
async fn public_url_is_used_for_handed_out_urls() {
    let srv = Served::start(
        &[
            "dev",
            "--port",
            "0",
            "--public-url",
            "https://streams.example.com/",
        ],
        &[],
        1,
    );
    let base = format!("http://{}/v1/stream", srv.addr(false));
    let c = reqwest::Client::new();
    let body = serde_json::json!({
        "type": "webhook", "streams": ["jobs/a"],
        "webhook": { "url": "http://127.0.0.1:9/hook" },
    });
    let r = c
        .put(format!("{base}/__ds/subscriptions/pub"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        v["webhook"]["signing"]["jwks_url"], "https://streams.example.com/v1/stream/__ds/jwks.json",
        "{v}"
    );
}

/// `--help` documents every flag with its environment variable and default.
#[test]
fn help_names_environment_variables_and_defaults() {
    let out = run_once(&["run", "--help"], &[]);
    assert!(out.status.unwrap().success(), "{out:?}");
    for needle in [
        "--max-append-bytes",
        "DS_MAX_APPEND_BYTES",
        "--long-poll-timeout",
        "DS_LONG_POLL_TIMEOUT",
        "Default: 30s",
        "--tls-cert",
        "DS_TLS_CERT",
        "--config",
        "DS_CONFIG",
        "Examples:",
    ] {
        assert!(
            out.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            out.stdout
        );
    }
    let out = run_once(&["config", "check", "--help"], &[]);
    assert!(out.stdout.contains("Examples:"), "{}", out.stdout);
}

/// The commented example config in the repository is valid.
#[test]
fn example_config_in_repository_is_valid() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/durable-streams.toml"
    );
    let out = run_once(&["config", "check", file], &[]);
    assert!(out.status.unwrap().success(), "{out:?}");
    let t = effective(&out.stdout);
    assert_eq!(
        get(&t, "server", "data_dir").as_str(),
        Some("/var/lib/durable-streams")
    );
}

/// `config hash-token` prints the SHA-256 hex of the token read from stdin
/// (the form `[[auth.tokens]] sha256` expects) and refuses empty input.
#[test]
fn hash_token_reads_stdin_and_prints_sha256_hex() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_durable-streams-server"))
            .args(["config", "hash-token"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run("secret-token\n");
    assert!(out.status.success(), "{out:?}");
    // printf %s secret-token | sha256sum
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "930bbdc51b6aed5c2a5678fd6e28dee7a05e8a4b643cfc0b4427c3efb86c0d94"
    );
    let out = run("  \n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));
}

/// `config check` masks secrets: a JWT HS secret prints as "***" and never
/// in clear, while the rest of the auth section prints as configured.
#[test]
fn check_masks_secrets() {
    let dir = TempDir::new("cfg-secret");
    let secret = "s3cret-0123456789abcdef0123456789abcdef";
    let file = dir.write(
        "c.toml",
        &format!(
            "[auth.jwt]\nhs_secret = \"{secret}\"\nissuer = \"https://idp.example.com\"\n\
             [[auth.tokens]]\nname = \"svc\"\n\
             sha256 = \"930bbdc51b6aed5c2a5678fd6e28dee7a05e8a4b643cfc0b4427c3efb86c0d94\"\n\
             grants = [{{ prefix = \"orders/\", ops = [\"read\"] }}]\n"
        ),
    );
    let out = run_once(&["config", "check", &file], &[]);
    assert!(out.status.unwrap().success(), "{out:?}");
    assert!(
        !out.stdout.contains(secret),
        "secret printed:\n{}",
        out.stdout
    );
    let t = effective(&out.stdout);
    let jwt = t["auth"]["jwt"].as_table().unwrap();
    assert_eq!(jwt["hs_secret"].as_str(), Some("***"));
    assert_eq!(jwt["issuer"].as_str(), Some("https://idp.example.com"));
}

/// A bad auth value (a token hash that is not 64 hex digits) is refused at
/// load time by `config check` and by `run`, naming the field.
#[test]
fn bad_auth_value_is_refused_naming_the_field() {
    let dir = TempDir::new("cfg-auth");
    let file = dir.write(
        "c.toml",
        "[[auth.tokens]]\nname = \"x\"\nsha256 = \"abc\"\ngrants = [{ prefix = \"\", ops = [\"read\"] }]\n",
    );
    for args in [
        vec!["config", "check", file.as_str()],
        vec!["dev", "--port", "0", "--config", file.as_str()],
    ] {
        let out = run_once(&args, &[]);
        assert!(!out.status.unwrap().success(), "{out:?}");
        assert!(
            out.stderr.contains("auth.tokens[0].sha256"),
            "{}",
            out.stderr
        );
    }
}
