//! The DHCP client against a real dnsmasq, inside network namespaces this
//! test creates: `SRV` holds dnsmasq on one end of a veth pair, `CLI` holds
//! the other end, and the client runs on a thread that `setns`-ed into `CLI`
//! (netlink and sockets opened there belong to `CLI`), so the host's own
//! interfaces are never touched. Needs root, `ip netns` and dnsmasq; without
//! them the tests fail, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use warden_agent::net::{dhcp_first_lease_with, Bringup, DhcpOptions, NetError};
use warden_protocol::hello::Lease;

const CLIENT_IF: &str = "wd-cli0";
const SERVER_IF: &str = "wd-srv0";

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    });
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair, and maybe a dnsmasq; all of it is
/// removed on drop, also when the test panics.
struct Lab {
    server_ns: String,
    client_ns: String,
    subnet: String,
    dir: tempfile::TempDir,
    dnsmasq: Option<Child>,
}

impl Lab {
    /// `subnet` is the first three octets, e.g. `10.213.1`.
    fn new(tag: &str, subnet: &str) -> Lab {
        let pid = std::process::id();
        let server_ns = format!("warden{pid}{tag}s");
        let client_ns = format!("warden{pid}{tag}c");
        let out = Command::new("ip")
            .args(["netns", "add", &server_ns])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns add`: {e} (is iproute2 installed?)"));
        if !out.status.success() {
            panic!(
                "this test needs network namespaces, and `ip netns add {server_ns}` is not permitted here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // From here on, Drop cleans up whatever exists.
        let lab = Lab {
            server_ns,
            client_ns,
            subnet: subnet.to_string(),
            dir: tempfile::tempdir().unwrap(),
            dnsmasq: None,
        };
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "link",
            "add",
            SERVER_IF,
            "netns",
            &lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            &lab.client_ns,
        ]);
        let server_addr = format!("{subnet}.1/24");
        ip(&[
            "-n",
            &lab.server_ns,
            "addr",
            "add",
            &server_addr,
            "dev",
            SERVER_IF,
        ]);
        ip(&["-n", &lab.server_ns, "link", "set", SERVER_IF, "up"]);
        ip(&["-n", &lab.server_ns, "link", "set", "lo", "up"]);
        // The client's end and its lo stay down: bringing them up is the client's job.
        lab
    }

    fn start_dnsmasq(&mut self) {
        let subnet = &self.subnet;
        let dir = self.dir.path();
        let log = dir.join("dnsmasq.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server_ns,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            // No DNS service: only DHCP is under test.
            .arg("--port=0")
            .arg(format!("--interface={SERVER_IF}"))
            .arg("--bind-interfaces")
            .arg(format!(
                "--dhcp-range={subnet}.100,{subnet}.150,255.255.255.0,1h"
            ))
            .arg(format!("--dhcp-option=option:router,{subnet}.1"))
            .arg(format!("--dhcp-option=option:dns-server,{subnet}.53"))
            .arg("--dhcp-authoritative")
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg(format!("--log-facility={}", log.display()))
            .arg("--log-dhcp")
            // Stay root so the lease and log files in the tempdir stay writable.
            .arg("--user=root")
            // It logs to the file above too; the failure messages quote it.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dnsmasq: {e} (run scripts/setup)"));
        self.dnsmasq = Some(child);
        // Ready when it has logged its DHCP range; if it exits, say why.
        let start = Instant::now();
        loop {
            if let Some(status) = self.dnsmasq.as_mut().unwrap().try_wait().unwrap() {
                panic!("dnsmasq exited ({status}): {}", self.dnsmasq_log());
            }
            if self.dnsmasq_log().contains("DHCP, IP range") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "dnsmasq did not start: {}",
                self.dnsmasq_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// Runs the client on a thread inside the client namespace.
    fn run_client(&self, opts: DhcpOptions, bringup: Bringup) -> Result<Lease, NetError> {
        let ns_path = PathBuf::from("/run/netns").join(&self.client_ns);
        std::thread::spawn(move || {
            let ns =
                File::open(&ns_path).unwrap_or_else(|e| panic!("open {}: {e}", ns_path.display()));
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns into the client namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(dhcp_first_lease_with(&opts, &bringup))
        })
        .join()
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            // `ip netns exec` execs dnsmasq, so this PID is dnsmasq's own.
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn resolv_conf_in(dir: &Path) -> Bringup {
    Bringup {
        resolv_conf: Some(dir.join("resolv.conf")),
        ..Bringup::default()
    }
}

#[test]
fn gets_a_lease_from_dnsmasq_and_configures_the_namespace() {
    let mut lab = Lab::new("a", "10.213.1");
    lab.start_dnsmasq();
    let opts = DhcpOptions {
        interfaces: Some(vec![CLIENT_IF.to_string()]),
        attempt_timeout: Duration::from_secs(30),
    };
    let lease = lab
        .run_client(opts, resolv_conf_in(lab.dir.path()))
        .unwrap_or_else(|e| panic!("no lease: {e}\ndnsmasq log:\n{}", lab.dnsmasq_log()));
    println!("{lease:?}");

    assert_eq!(lease.interface, CLIENT_IF);
    assert_eq!(lease.router.as_deref(), Some("10.213.1.1"));
    assert_eq!(lease.server, "10.213.1.1");
    assert_eq!(lease.lease_seconds, 3600);
    let (addr, prefix) = lease.address.split_once('/').unwrap();
    assert_eq!(prefix, "24");
    let host: u8 = addr.strip_prefix("10.213.1.").unwrap().parse().unwrap();
    assert!(
        (100..=150).contains(&host),
        "{addr} is outside dnsmasq's range"
    );

    // The server agrees it handed out this address.
    let leases = std::fs::read_to_string(lab.dir.path().join("leases")).unwrap();
    assert!(
        leases.contains(addr),
        "dnsmasq's lease file does not list {addr}: {leases}"
    );

    // The kernel in the client namespace has the address, the default route and lo up.
    let addrs = ip(&["-n", &lab.client_ns, "-4", "addr", "show", "dev", CLIENT_IF]);
    assert!(
        addrs.contains(&format!("inet {}", lease.address)),
        "{addrs}"
    );
    let routes = ip(&["-n", &lab.client_ns, "-4", "route", "show", "default"]);
    assert!(
        routes.contains(&format!("default via 10.213.1.1 dev {CLIENT_IF}")),
        "{routes}"
    );
    let lo = ip(&["-n", &lab.client_ns, "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "lo is not up: {lo}");

    let resolv = std::fs::read_to_string(lab.dir.path().join("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 10.213.1.53"), "{resolv}");

    // And the kernel would reach the server over that link, from that address.
    let via = ip(&["-n", &lab.client_ns, "route", "get", "10.213.1.1"]);
    assert!(
        via.contains(&format!("dev {CLIENT_IF} src {addr}")),
        "{via}"
    );
}

#[test]
fn no_server_is_no_answer_naming_the_interface() {
    let lab = Lab::new("b", "10.213.2");
    let timeout = Duration::from_secs(3);
    // Default choice: the namespace only has lo and the veth, so the veth
    // (virtual, but all there is) is tried.
    let opts = DhcpOptions {
        interfaces: None,
        attempt_timeout: timeout,
    };
    let err = lab
        .run_client(opts, resolv_conf_in(lab.dir.path()))
        .unwrap_err();
    println!("{err}");
    match &err {
        NetError::NoAnswer {
            interfaces,
            timeout: t,
        } => {
            assert!(interfaces.contains(CLIENT_IF), "{interfaces}");
            assert!(interfaces.contains("no OFFER"), "{interfaces}");
            assert_eq!(*t, timeout);
        }
        other => panic!("expected NoAnswer, got {other:?}"),
    }
    assert!(err.to_string().contains(CLIENT_IF));
    let addrs = ip(&["-n", &lab.client_ns, "-4", "addr", "show", "dev", CLIENT_IF]);
    assert!(
        !addrs.contains("inet "),
        "no lease, yet an address: {addrs}"
    );
    assert!(!lab.dir.path().join("resolv.conf").exists());
}

#[test]
fn unknown_interface_is_no_interface() {
    let lab = Lab::new("c", "10.213.3");
    let opts = DhcpOptions {
        interfaces: Some(vec!["eth-none".to_string()]),
        attempt_timeout: Duration::from_secs(2),
    };
    let err = lab
        .run_client(opts, resolv_conf_in(lab.dir.path()))
        .unwrap_err();
    assert!(
        matches!(&err, NetError::NoInterface(what) if what.contains("eth-none")),
        "{err:?}"
    );
}
