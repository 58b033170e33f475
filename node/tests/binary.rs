//! The `hashgrid-node` binary: starts a new cluster, writes a private admin token, stops
//! cleanly on SIGTERM, keeps its identity across restarts, refuses a second node on the
//! same data directory.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn start(data: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(" ready on 127.0.0.1:"), "{line:?}");
    (child, line)
}

/// The whole response to `GET path` (HTTP/1.1, the connection closed after it).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

fn stop(child: &mut Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn starts_stops_and_restarts_as_the_same_node() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (mut child, first) = start(&data);
    let token = data.join("admin.token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin token must be private");
    assert_eq!(std::fs::read_to_string(&token).unwrap().trim().len(), 64);
    let addr = std::fs::read_to_string(data.join("node.addr")).unwrap();
    assert!(first.contains(addr.trim()));
    // Metrics on the port the node picked (`--metrics-listen 127.0.0.1:0`), named in its data dir.
    let metrics = std::fs::read_to_string(data.join("metrics.addr")).unwrap();
    let page = http_get(metrics.trim(), "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.300}");
    assert!(page.contains("hashgrid_store_chunks 0"), "{page:.2000}");
    assert!(http_get(metrics.trim(), "/nothing").starts_with("HTTP/1.1 404"));

    // A second node on the same directory is refused, and the first keeps running.
    let second = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another node using this data dir"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(child.try_wait().unwrap().is_none());

    stop(&mut child);
    let token_before = std::fs::read_to_string(&token).unwrap();
    let (mut child, again) = start(&data);
    let id = |l: &str| l.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(id(&first), id(&again), "node id survives restart");
    assert_eq!(
        std::fs::read_to_string(&token).unwrap(),
        token_before,
        "token is made once"
    );
    stop(&mut child);
}

#[test]
fn help_names_the_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("./hashgrid-data"), "{help}");
    assert!(help.contains("127.0.0.1:7420"), "{help}");
}
