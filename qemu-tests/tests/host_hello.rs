//! Host tier: the real agent in host mode against a real swtpm (TCP) and the
//! real attestation server on 127.0.0.1, checked through the real wardenctl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use warden_qemu_tests::console::{event_name, parse_events};
use warden_qemu_tests::process::run_with_timeout;
use warden_qemu_tests::{prereq, require_program, target_bin, Server, Swtpm, SwtpmTransport};

/// The agent binary, or None after reporting why the test cannot run.
fn prerequisites(test: &str) -> Option<PathBuf> {
    let found = (|| {
        require_program("swtpm_setup")?;
        target_bin("warden-attest-server")?;
        target_bin("wardenctl")?;
        target_bin("warden-agent")
    })();
    prereq(test, found)
}

fn run_agent(agent: &PathBuf, server: &Server, pin: &str, tpm: &Swtpm) -> Output {
    let mut cmd = Command::new(agent);
    cmd.arg("--server")
        .arg(server.url())
        .arg("--ca")
        .arg(pin)
        .arg("--tcti")
        .arg(tpm.tcti().unwrap())
        .args(["--max-attempts", "3", "--log", "debug"]);
    run_with_timeout("warden-agent", &mut cmd, Duration::from_secs(180)).unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "agent exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn event<'a>(events: &'a [Value], name: &str, out: &Output) -> &'a Value {
    events
        .iter()
        .find(|e| event_name(e) == Some(name))
        .unwrap_or_else(|| panic!("no `{name}` event\n{}", describe(out)))
}

#[test]
fn host_agent_says_hello_and_server_lists_the_node() {
    let Some(agent) = prerequisites("host_hello") else {
        return;
    };
    let server = Server::start().unwrap();
    let tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();

    let out = run_agent(&agent, &server, server.ca_pin(), &tpm);
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));

    let tpm_ready = event(&events, "tpm_ready", &out);
    let hello_ok = event(&events, "hello_ok", &out);
    // A hello is not enough to be ready: enrollment comes next, and this
    // server trusts no EK manufacturer (host_attest.rs covers the rest).
    assert!(
        events
            .iter()
            .any(|e| event_name(e) == Some("state") && e["from"] == "Hello" && e["to"] == "Enroll"),
        "{}",
        describe(&out)
    );
    let fatal = event(&events, "fatal", &out);
    assert!(
        fatal["error"].as_str().unwrap().contains("ek_untrusted"),
        "{}",
        describe(&out)
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        events.iter().all(|e| event_name(e) != Some("ready")),
        "{}",
        describe(&out)
    );
    assert_eq!(tpm_ready["pcr_count"], 24, "{tpm_ready}");
    let node_id = tpm_ready["node_id"].as_str().unwrap();
    assert_eq!(hello_ok["node_id"], node_id, "{hello_ok}");
    assert_eq!(hello_ok["new_node"], true, "{hello_ok}");

    let nodes = server.nodes_json().unwrap().nodes;
    assert_eq!(nodes.len(), 1, "{nodes:#?}");
    let node = &nodes[0];
    assert_eq!(node.node_id, node_id);
    assert_eq!(node.pcrs.len(), 24, "{:?}", node.pcrs);
    assert_eq!(node.hello_count, 1);
    assert_eq!(
        node.ek_algorithm,
        tpm_ready["ek_algorithm"].as_str().unwrap()
    );
}

#[test]
fn host_agent_refuses_a_wrong_ca_pin() {
    let Some(agent) = prerequisites("host_hello_wrong_pin") else {
        return;
    };
    let server = Server::start().unwrap();
    let tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert_ne!(wrong, server.ca_pin());

    let out = run_agent(&agent, &server, &wrong, &tpm);
    eprintln!("{}", describe(&out));
    assert!(!out.status.success(), "{}", describe(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase();
    assert!(
        all.contains("pin"),
        "the agent's output does not name the pin mismatch\n{}",
        describe(&out)
    );
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    assert!(
        events.iter().all(|e| event_name(e) != Some("hello_ok")),
        "{}",
        describe(&out)
    );
    // The fatal event itself names the pin it was given.
    let fatal = event(&events, "fatal", &out)["error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        fatal.contains("pin") && fatal.contains(&"0".repeat(64)),
        "the fatal event does not name the pin mismatch: {fatal}"
    );

    let nodes = server.nodes_json().unwrap().nodes;
    assert!(nodes.is_empty(), "server stored a node: {nodes:#?}");
}

#[test]
fn host_agent_names_an_unreachable_server_and_retries_then_fails() {
    let Some(agent) = prerequisites("host_hello_unreachable") else {
        return;
    };
    let tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let mut cmd = Command::new(&agent);
    cmd.args([
        "--server",
        &url,
        "--ca",
        &format!("sha256:{}", "ab".repeat(32)),
    ])
    .arg("--tcti")
    .arg(tpm.tcti().unwrap())
    .args(["--max-attempts", "2"]);
    let out = run_with_timeout("warden-agent", &mut cmd, Duration::from_secs(120)).unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    let retry = event(&events, "retry", &out);
    assert_eq!(retry["step"], "hello", "{retry}");
    assert!(
        retry["error"].as_str().unwrap().contains(&url),
        "the retry does not name the URL: {retry}"
    );
    let fatal = event(&events, "fatal", &out);
    let error = fatal["error"].as_str().unwrap();
    assert!(
        error.contains(&url) && error.to_lowercase().contains("connect"),
        "the fatal error does not name the URL and the cause: {fatal}"
    );
}

#[test]
fn host_agent_without_a_tpm_reports_a_clear_fatal_error() {
    let Some(agent) = prerequisites("host_hello_no_tpm") else {
        return;
    };
    let server = Server::start().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let mut cmd = Command::new(&agent);
    cmd.args(["--server", &server.url(), "--ca", server.ca_pin()])
        .args(["--tcti", &tcti, "--max-attempts", "2"]);
    let out = run_with_timeout("warden-agent", &mut cmd, Duration::from_secs(120)).unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    let fatal = event(&events, "fatal", &out);
    let error = fatal["error"].as_str().unwrap();
    assert!(
        error.contains(&tcti),
        "the fatal error does not name the TCTI: {fatal}"
    );
    assert!(
        events.iter().all(|e| event_name(e) != Some("hello_ok")),
        "{}",
        describe(&out)
    );
    assert!(server.nodes_json().unwrap().nodes.is_empty());
}
