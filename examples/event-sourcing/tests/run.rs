//! Runs the example against the real server binary; the example checks its own results.

#![allow(clippy::unwrap_used)]

#[path = "../../../crates/client/tests/common/mod.rs"]
mod common;

/// Every step of the example (append, replay, live tail + checkpoint, snapshot, projections, exactly-once) passes its checks.
#[test]
fn example_passes_its_checks() {
    let srv = common::Server::start(&["--long-poll-timeout", "1s"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_event-sourcing-example"))
        .arg(srv.base())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "1. appended",
        "2. replayed",
        "3. live tail",
        "4. restored",
        "5. projections",
        "6. exactly-once",
    ] {
        assert!(stdout.contains(step), "missing {step}:\n{stdout}");
    }
    assert!(stdout.trim_end().ends_with("all checks passed"), "{stdout}");
}
